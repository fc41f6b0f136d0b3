//! The gRPC codec of the `switchyard.v1` services: prost's encoding, with a decode failure
//! reported as `INVALID_ARGUMENT` naming the message type, where `tonic-prost` reports
//! `INTERNAL`. Bytes that do not decode are the caller's mistake (or an attack), not a fault of
//! the server, and clients and alerting treat `INTERNAL` as the latter. The generated clients
//! share the codec, so a reply that does not decode reads `INVALID_ARGUMENT` there too; the
//! message says which message failed either way.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// `tonic_prost::ProstCodec` with the decode error mapped; see the module docs.
#[derive(Debug, Clone)]
pub struct SwitchyardCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SwitchyardCodec<T, U> {
    fn default() -> Self {
        SwitchyardCodec(PhantomData)
    }
}

impl<T, U> Codec for SwitchyardCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SwitchyardDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SwitchyardDecoder(PhantomData)
    }
}

/// Decodes `U`, refusing undecodable bytes as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct SwitchyardDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SwitchyardDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let name = std::any::type_name::<U>();
            let name = name.rsplit("::").next().unwrap_or(name);
            Status::invalid_argument(format!("the message is not a valid {name}: {e}"))
        })
    }
}
