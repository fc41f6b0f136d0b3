//! The device-aware tensor type that weights and activations travel in.
//!
//! A [`Tensor`] is a shape, an element type and host storage: activations in f32, weights in
//! f32 or bf16 (FP8 checkpoints are dequantised to bf16 when loaded), or bf16 packed for the
//! CPU GEMM kernels. Where layers run is a [`Compute`]: the CPU, or (feature `cuda`) one GPU or
//! several of one node, which hold the weights of what they run in their own buffers (the
//! `cuda` module) — tensors cross to a device and back at those layers' edges.

use std::fmt;

use half::bf16;

use crate::cpu::packed::{PackedBf16, PackedFp8};
use crate::dtype::DType;
use crate::error::{EngineError, Result};

/// Where a process computes, and where a tensor's storage lives. Tensors are host tensors
/// today; a CUDA device holds the weights of the layers it runs (the `cuda` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device `N` (`cuda:N`), with the `cuda` feature.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("must be `cpu`, `cuda` or `cuda:N`, got {s:?}")),
        }
    }
}

/// Where the router's weights go: the host (`cpu`), one GPU (`cuda:N`), or several GPUs of
/// one node (`cuda:0,1,…`) that split every projection between them, tensor-parallel over
/// NCCL. Never empty; a list holds distinct CUDA devices only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Devices(Vec<Device>);

impl Devices {
    pub fn one(device: Device) -> Devices {
        Devices(vec![device])
    }

    pub fn as_slice(&self) -> &[Device] {
        &self.0
    }

    /// Checks at start-up that the devices can be used (see [`Device::check`]); a group also
    /// needs the NCCL library.
    pub fn check(&self) -> Result<()> {
        Compute::open_all(self).map(|_| ())
    }
}

impl fmt::Display for Devices {
    /// `cpu`, `cuda:N`, or `cuda:0,cuda:1,…` (which parses back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            d.fmt(f)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Devices {
    type Err = String;

    /// `cpu`, `cuda`, `cuda:N`, or a list of GPUs `cuda:0,1,…` (also `cuda:0,cuda:1`).
    fn from_str(s: &str) -> std::result::Result<Devices, String> {
        if !s.contains(',') {
            return s.parse().map(Devices::one);
        }
        let list = s.strip_prefix("cuda:").ok_or_else(|| {
            format!("a list of devices must be CUDA devices, `cuda:0,1,…`, got {s:?}")
        })?;
        let mut ordinals: Vec<usize> = Vec::new();
        for item in list.split(',') {
            let n = item
                .trim()
                .strip_prefix("cuda:")
                .unwrap_or(item.trim())
                .parse()
                .map_err(|_| format!("{item:?} in {s:?} is not a CUDA device number"))?;
            if ordinals.contains(&n) {
                return Err(format!("cuda:{n} appears twice in {s:?}"));
            }
            ordinals.push(n);
        }
        Ok(Devices(ordinals.into_iter().map(Device::Cuda).collect()))
    }
}

/// An opened compute device: what layers that run somewhere other than the host hold.
#[derive(Clone, Debug, Default)]
pub enum Compute {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::cuda::Gpu>),
    /// Several GPUs of one node splitting each projection (tensor parallelism).
    #[cfg(feature = "cuda")]
    CudaGroup(std::sync::Arc<crate::cuda::GpuGroup>),
}

impl Compute {
    /// Opens `device`; fails (never panics) when it cannot be used.
    pub fn open(device: Device) -> Result<Compute> {
        match device {
            Device::Cpu => Ok(Compute::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Ok(Compute::Cuda(crate::cuda::Gpu::open(n)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => device.check().map(|_| Compute::Cpu),
        }
    }

    /// Opens one device, or several as a tensor-parallel group.
    pub fn open_all(devices: &Devices) -> Result<Compute> {
        match devices.as_slice() {
            [one] => Compute::open(*one),
            #[cfg(feature = "cuda")]
            many => {
                let ordinals: Vec<usize> = many
                    .iter()
                    .filter_map(|d| match d {
                        Device::Cuda(n) => Some(*n),
                        Device::Cpu => None,
                    })
                    .collect();
                Ok(Compute::CudaGroup(crate::cuda::GpuGroup::open(&ordinals)?))
            }
            #[cfg(not(feature = "cuda"))]
            many => Err(EngineError::Device(format!(
                "{} was asked for, but this binary was built without CUDA support; rebuild with `--features cuda-12` or `cuda-13` (the CUDA major version of the machine's libraries)",
                Devices(many.to_vec())
            ))),
        }
    }

    /// The device, or the first of a group.
    pub fn device(&self) -> Device {
        match self {
            Compute::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Compute::Cuda(gpu) => Device::Cuda(gpu.ordinal()),
            #[cfg(feature = "cuda")]
            Compute::CudaGroup(group) => Device::Cuda(group.gpus()[0].ordinal()),
        }
    }
}

impl Device {
    /// Checks at start-up that this device can be used: for CUDA, that the driver, cuBLAS and
    /// NVRTC libraries load and the device exists (never a panic from a missing library).
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => crate::cuda::Gpu::open(n).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => Err(EngineError::Device(format!(
                "cuda:{n} was asked for, but this binary was built without CUDA support; rebuild with `--features cuda-12` or `cuda-13` (the CUDA major version of the machine's libraries)"
            ))),
        }
    }
}

/// Host storage, one variant per element type the compute layer handles.
#[derive(Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// bf16 weights in the blocked layout of [`crate::cpu::packed`]; logically `[n, k]`.
    Bf16Packed(PackedBf16),
    /// FP8 e4m3 weights with block scales in the same layout; logically `[n, k]`. Boxed: a
    /// tensor stays as small as the other variants make it.
    Fp8Packed(Box<PackedFp8>),
}

impl fmt::Debug for CpuStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuStorage::F32(v) => write!(f, "F32(len={})", v.len()),
            CpuStorage::Bf16(v) => write!(f, "Bf16(len={})", v.len()),
            CpuStorage::Bf16Packed(p) => write!(f, "{p:?}"),
            CpuStorage::Fp8Packed(p) => write!(f, "{p:?}"),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

/// A dense row-major tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::F32(data)),
        })
    }

    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::Bf16(data)),
        })
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::F32(vec![0.0; shape.iter().product()])),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn device(&self) -> Device {
        match self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(_)) => DType::F32,
            Storage::Cpu(CpuStorage::Bf16(_) | CpuStorage::Bf16Packed(_)) => DType::Bf16,
            Storage::Cpu(CpuStorage::Fp8Packed(_)) => DType::F8E4M3,
        }
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        match self.cpu_storage() {
            // The codes and their block scales.
            CpuStorage::Fp8Packed(p) => p.size_in_bytes(),
            _ => self.elem_count() * self.dtype().size_in_bytes(),
        }
    }

    /// `(rows, cols)` of a rank-2 tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(EngineError::Shape(format!(
                "expected a rank-2 tensor, got shape {:?}",
                self.shape
            ))),
        }
    }

    pub fn cpu_storage(&self) -> &CpuStorage {
        match &self.storage {
            Storage::Cpu(s) => s,
        }
    }

    /// The f32 elements; an error for other element types.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match self.cpu_storage() {
            CpuStorage::F32(v) => Ok(v),
            CpuStorage::Bf16(_) | CpuStorage::Bf16Packed(_) | CpuStorage::Fp8Packed(_) => Err(
                EngineError::Shape(format!("expected f32 storage, got {}", self.dtype())),
            ),
        }
    }

    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            Storage::Cpu(_) => Err(EngineError::Shape(format!(
                "expected f32 storage, got {dtype}"
            ))),
        }
    }

    /// Row-major bf16 elements; an error for other storage.
    pub fn bf16_slice(&self) -> Result<&[bf16]> {
        match self.cpu_storage() {
            CpuStorage::Bf16(v) => Ok(v),
            _ => Err(EngineError::Shape(format!(
                "expected row-major bf16 storage, got {:?}",
                self.cpu_storage()
            ))),
        }
    }

    /// A packed FP8 weight as a `[n, k]` tensor.
    pub fn from_fp8_packed(w: PackedFp8) -> Tensor {
        Tensor {
            shape: vec![w.n(), w.k()],
            storage: Storage::Cpu(CpuStorage::Fp8Packed(Box::new(w))),
        }
    }

    /// Re-lays a bf16 weight `[n, k]` in the blocked layout of the fast GEMM kernels, when this
    /// CPU has them; otherwise returns it unchanged. Use for weights that only feed `matmul_t`.
    pub fn pack_for_matmul(self) -> Tensor {
        if !crate::cpu::matmul::packed_kernels_available() {
            return self;
        }
        match (&self.storage, &self.shape[..]) {
            (Storage::Cpu(CpuStorage::Bf16(v)), &[n, k]) => {
                // SAFETY: bf16 is a transparent u16.
                let bits: &[u16] =
                    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) };
                Tensor {
                    storage: Storage::Cpu(CpuStorage::Bf16Packed(PackedBf16::pack(bits, n, k))),
                    shape: self.shape.clone(),
                }
            }
            _ => self,
        }
    }

    /// Consumes the tensor and returns its elements widened to f32.
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => v,
            Storage::Cpu(CpuStorage::Bf16(v)) => v.into_iter().map(f32::from).collect(),
            Storage::Cpu(CpuStorage::Bf16Packed(p)) => p
                .unpack()
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect(),
            Storage::Cpu(CpuStorage::Fp8Packed(p)) => p
                .to_bf16()
                .unpack()
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect(),
        }
    }

    /// Returns a copy with elements widened to f32.
    pub fn to_f32(&self) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(CpuStorage::F32(self.clone().into_f32_vec())),
        }
    }

    /// Returns a copy rounded to bf16.
    pub fn to_bf16(&self) -> Tensor {
        let data = match self.cpu_storage() {
            CpuStorage::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
            CpuStorage::Bf16(v) => v.clone(),
            CpuStorage::Bf16Packed(p) => p.unpack().into_iter().map(bf16::from_bits).collect(),
            CpuStorage::Fp8Packed(p) => p
                .to_bf16()
                .unpack()
                .into_iter()
                .map(bf16::from_bits)
                .collect(),
        };
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(CpuStorage::Bf16(data)),
        }
    }

    /// Rows `start..end` of the leading dimension, copied.
    pub fn narrow_rows(&self, start: usize, end: usize) -> Result<Tensor> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if start > end || end > rows {
            return Err(EngineError::Shape(format!(
                "row range {start}..{end} out of bounds for shape {:?}",
                self.shape
            )));
        }
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        let storage = match self.cpu_storage() {
            CpuStorage::F32(v) => CpuStorage::F32(v[start * row..end * row].to_vec()),
            CpuStorage::Bf16(v) => CpuStorage::Bf16(v[start * row..end * row].to_vec()),
            CpuStorage::Bf16Packed(_) | CpuStorage::Fp8Packed(_) => {
                return self.to_bf16().narrow_rows(start, end);
            }
        };
        Ok(Tensor {
            shape,
            storage: Storage::Cpu(storage),
        })
    }

    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, self.elem_count())?;
        self.shape = shape.to_vec();
        Ok(self)
    }
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let expected: usize = shape.iter().product();
    if expected != len {
        return Err(EngineError::Shape(format!(
            "shape {shape:?} needs {expected} elements, got {len}"
        )));
    }
    Ok(())
}

/// Concatenates rank-2 tensors of one dtype and width along rows.
pub fn concat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| EngineError::Shape("concat_rows of no tensors".into()))?;
    let (_, cols) = first.dims2()?;
    let mut rows = 0;
    for p in parts {
        let (r, c) = p.dims2()?;
        if c != cols || p.dtype() != first.dtype() {
            return Err(EngineError::Shape(format!(
                "concat_rows: [{r}, {c}] {} does not match [_, {cols}] {}",
                p.dtype(),
                first.dtype()
            )));
        }
        rows += r;
    }
    let fp8: Option<Vec<&PackedFp8>> = parts
        .iter()
        .map(|p| match p.cpu_storage() {
            CpuStorage::Fp8Packed(w) => Some(&**w),
            _ => None,
        })
        .collect();
    if let Some(joined) = fp8.and_then(|w| PackedFp8::concat_rows(&w)) {
        return Ok(Tensor::from_fp8_packed(joined));
    }
    match first.cpu_storage() {
        CpuStorage::F32(_) => {
            let mut data = Vec::with_capacity(rows * cols);
            for p in parts {
                data.extend_from_slice(p.as_f32()?);
            }
            Tensor::from_f32(&[rows, cols], data)
        }
        // FP8 parts whose rows do not end on a whole block are widened.
        CpuStorage::Bf16(_) | CpuStorage::Bf16Packed(_) | CpuStorage::Fp8Packed(_) => {
            let mut data = Vec::with_capacity(rows * cols);
            for p in parts {
                match p.cpu_storage() {
                    CpuStorage::Bf16(v) => data.extend_from_slice(v),
                    _ => data.extend_from_slice(p.to_bf16().bf16_slice()?),
                }
            }
            Tensor::from_bf16(&[rows, cols], data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_one_device_or_a_list_of_gpus() {
        let parse = |s: &str| s.parse::<Devices>();
        assert_eq!(parse("cpu").unwrap().as_slice(), [Device::Cpu]);
        assert_eq!(parse("cuda").unwrap().as_slice(), [Device::Cuda(0)]);
        assert_eq!(parse("cuda:3").unwrap().as_slice(), [Device::Cuda(3)]);
        let two = [Device::Cuda(0), Device::Cuda(1)];
        assert_eq!(parse("cuda:0,1").unwrap().as_slice(), two);
        assert_eq!(parse("cuda:0,cuda:1").unwrap().as_slice(), two);
        assert_eq!(parse("cuda:0, 1").unwrap().as_slice(), two);
        for d in ["cpu", "cuda:2", "cuda:0,1,2"] {
            let devices = parse(d).unwrap();
            assert_eq!(parse(&devices.to_string()).unwrap(), devices, "{d}");
        }
        let err = parse("cuda:0,0").unwrap_err();
        assert!(err.contains("cuda:0 appears twice"), "{err}");
        let err = parse("cpu,cuda:0").unwrap_err();
        assert!(err.contains("must be CUDA devices"), "{err}");
        let err = parse("cuda:0,x").unwrap_err();
        assert!(
            err.contains("\"x\"") && err.contains("not a CUDA device number"),
            "{err}"
        );
        assert!(parse("gpu").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_group_without_cuda_support_is_a_clear_error() {
        let err = Compute::open_all(&"cuda:0,1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cuda:0,cuda:1") && err.contains("--features cuda"),
            "{err}"
        );
    }

    #[test]
    fn tensor_rejects_data_that_does_not_fill_its_shape() {
        assert!(Tensor::from_f32(&[2, 3], vec![0.0; 5]).is_err());
        assert!(Tensor::from_f32(&[2, 3], vec![0.0; 6]).is_ok());
    }

    #[test]
    fn narrow_rows_copies_the_requested_rows() {
        let t = Tensor::from_f32(&[3, 2], vec![0., 1., 2., 3., 4., 5.]).unwrap();
        let n = t.narrow_rows(1, 3).unwrap();
        assert_eq!(n.shape(), &[2, 2]);
        assert_eq!(n.as_f32().unwrap(), &[2., 3., 4., 5.]);
        assert!(t.narrow_rows(2, 4).is_err());
    }

    #[test]
    fn bf16_round_trip_keeps_shape_and_widens() {
        let t = Tensor::from_f32(&[2], vec![1.5, -2.0]).unwrap().to_bf16();
        assert_eq!(t.dtype(), DType::Bf16);
        assert_eq!(t.to_f32().as_f32().unwrap(), &[1.5, -2.0]);
    }
}
