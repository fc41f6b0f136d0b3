//! Element types a checkpoint can hold, and the scalar conversions between them.
//!
//! Compute happens in f32; weights stay in their checkpoint precision (bf16 on the hot path)
//! and are widened in registers. FP8 e4m3 is a storage format only: it is dequantised with its
//! block scales when loaded.

use std::fmt;

use half::{bf16, f16};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3 ("fn" variant: no infinities, max 448), as DeepSeek-V3 stores its linear weights.
    F8E4M3,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// The name safetensors uses in its header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
            DType::F16 => "F16",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        match dtype {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::Bf16),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::F8_E4M3 => Some(DType::F8E4M3),
            _ => None,
        }
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::Bf16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::F8E4M3 => safetensors::Dtype::F8_E4M3,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "fp8-e4m3",
        })
    }
}

/// Largest finite e4m3fn value.
pub const F8E4M3_MAX: f32 = 448.0;

/// Decodes one FP8 e4m3fn byte. `0x7f` / `0xff` are NaN; there are no infinities.
pub fn f8e4m3_to_f32(byte: u8) -> f32 {
    F8E4M3_TABLE[byte as usize]
}

static F8E4M3_TABLE: [f32; 256] = {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = decode_f8e4m3(i as u8);
        i += 1;
    }
    table
};

const fn decode_f8e4m3(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((byte >> 3) & 0x0f) as i32;
    let mant = (byte & 0x07) as f32;
    if exp == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: mant/8 * 2^(1-7).
        mant / 8.0 / 64.0
    } else {
        let mut scale = 1.0f32;
        let mut e = exp - 7;
        while e > 0 {
            scale *= 2.0;
            e -= 1;
        }
        while e < 0 {
            scale /= 2.0;
            e += 1;
        }
        (1.0 + mant / 8.0) * scale
    };
    sign * magnitude
}

/// Encodes an f32 as FP8 e4m3fn: round to nearest (ties to even code), saturating at ±448.
pub fn f32_to_f8e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let sign = if value.is_sign_negative() { 0x80u8 } else { 0 };
    let magnitude = value.abs().min(F8E4M3_MAX);
    // Codes 0x00..=0x7e are the non-negative finite values in increasing order.
    let codes = &F8E4M3_TABLE[..0x7f];
    let upper = codes.partition_point(|&v| v < magnitude);
    let code = if upper == 0 {
        0
    } else if upper >= codes.len() {
        codes.len() - 1
    } else {
        let below = codes[upper - 1];
        let above = codes[upper];
        let (d_below, d_above) = (magnitude - below, above - magnitude);
        if d_below < d_above || (d_below == d_above && (upper - 1) % 2 == 0) {
            upper - 1
        } else {
            upper
        }
    };
    sign | code as u8
}

#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Decodes little-endian bytes of `dtype` into f32. FP8 is decoded without scales.
pub fn decode_to_f32(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        DType::F8E4M3 => out.extend(bytes.iter().map(|&b| f8e4m3_to_f32(b))),
    }
}

/// Decodes little-endian bytes of `dtype` into bf16 (round to nearest even from wider types).
pub fn decode_to_bf16(dtype: DType, bytes: &[u8], out: &mut Vec<bf16>) {
    out.clear();
    match dtype {
        DType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
        ),
        _ => {
            let mut wide = Vec::new();
            decode_to_f32(dtype, bytes, &mut wide);
            out.extend(wide.into_iter().map(bf16::from_f32));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f8e4m3_decodes_known_codes() {
        assert_eq!(f8e4m3_to_f32(0x00), 0.0);
        assert_eq!(f8e4m3_to_f32(0x38), 1.0); // exp 7, mant 0
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0xfe), -448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(f8e4m3_to_f32(0x3c), 1.5);
        assert!(f8e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn f8e4m3_round_trips_every_finite_code() {
        for code in 0u8..=0xff {
            if code & 0x7f == 0x7f {
                continue;
            }
            let v = f8e4m3_to_f32(code);
            let back = f32_to_f8e4m3(v);
            // +0 and -0 both decode to zero; everything else must round-trip exactly.
            if v == 0.0 {
                assert_eq!(back & 0x7f, 0);
            } else {
                assert_eq!(back, code, "code {code:#x} value {v}");
            }
        }
    }

    #[test]
    fn f8e4m3_encoding_rounds_to_nearest_and_saturates() {
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1000.0)), 448.0);
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(-1000.0)), -448.0);
        // 1.0 and 1.125 are neighbours; 1.06 is nearer 1.0, 1.07 nearer 1.125.
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1.06)), 1.0);
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1.07)), 1.125);
        // A tie (1.0625) goes to the even code (1.0 = 0x38).
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
    }
}
