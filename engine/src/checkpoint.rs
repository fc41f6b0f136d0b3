//! Reading Hugging Face safetensors checkpoints: one file or sharded with
//! `model.safetensors.index.json`, memory-mapped, opened lazily.
//!
//! A shard is mapped the first time one of its tensors is asked for, so a process that loads a
//! subset (an expert worker holding experts 0–7 of layers 3–5) never opens, let alone reads, the
//! shards it does not need; within a shard only the pages of the requested tensors are touched.
//! FP8 e4m3 weights are dequantised with their block `*_scale_inv` tensors here, or, for the
//! linear layers and as [`WeightFormat`] says, kept FP8 with their scales for the kernels
//! that widen them in registers.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::bf16;
use memmap2::Mmap;
use serde::Deserialize;

use crate::cpu::packed::{Fp8PackError, PackedFp8};
use crate::dtype::{self, DType};
use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Precision a weight is kept in once loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// How FP8 linear weights are held once loaded (`--weight-dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As stored: FP8 stays FP8 where this CPU has the kernels for it (AVX512-BF16 and VBMI),
    /// and is widened to bf16 elsewhere.
    #[default]
    AsStored,
    /// Every weight in bf16 (FP8 widened at load: twice the memory and decode bytes).
    Bf16,
    /// FP8 stays FP8; refused for a checkpoint that is not FP8, or a CPU without the kernels.
    Fp8,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(WeightFormat::AsStored),
            "bf16" => Ok(WeightFormat::Bf16),
            "fp8" => Ok(WeightFormat::Fp8),
            other => Err(format!(
                "must be fp8, bf16 or auto (as stored); got {other:?}"
            )),
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: String,
}

/// A tensor found in an opened shard: the shard, dtype, shape and byte range.
type Located = (Arc<Shard>, DType, Vec<usize>, std::ops::Range<usize>);

struct Shard {
    mmap: Mmap,
    /// name → (dtype, shape, byte range in the mmap)
    tensors: HashMap<String, (DType, Vec<usize>, std::ops::Range<usize>)>,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    /// tensor name → shard file name
    weight_map: HashMap<String, String>,
    shards: Mutex<HashMap<String, Arc<Shard>>>,
    fp8_block: [usize; 2],
    /// `config.json` has a `quantization_config` (the checkpoint is FP8).
    quantized: bool,
    weights: WeightFormat,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.weight_map.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

#[derive(Deserialize)]
struct QuantConfigFile {
    quantization_config: Option<QuantConfig>,
}

#[derive(Deserialize)]
struct QuantConfig {
    weight_block_size: Option<[usize; 2]>,
}

impl Shard {
    /// Drops a copied-out byte range from this process's resident set, so that a loaded model
    /// is not counted twice (heap copy + mapped file pages) in peak memory. The pages stay in
    /// the page cache and fault back in if read again.
    fn release(&self, range: std::ops::Range<usize>) {
        // SAFETY: the mapping is a read-only view of a file; dropping its pages cannot change
        // what a later read sees (it re-faults the same file bytes).
        let _ = unsafe {
            self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.len(),
            )
        };
    }
}

/// Says what is wrong with a header whose data offsets do not tile the data section.
/// safetensors reports the first tensor whose offset does not follow its predecessor's end,
/// which after a tensor is deleted from the header is the *next* tensor, not the missing one:
/// this names the hole, and the missing tensor itself when the index expects a name the
/// header lacks (`expected`). `None` when the header cannot even be read as JSON.
fn offset_gap<'a>(bytes: &[u8], expected: impl Iterator<Item = &'a str>) -> Option<String> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let header = bytes.get(8..8usize.checked_add(usize::try_from(len).ok()?)?)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut spans: Vec<(u64, u64, &str)> = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(name, info)| {
            let offsets = info.get("data_offsets")?.as_array()?;
            Some((
                offsets.first()?.as_u64()?,
                offsets.get(1)?.as_u64()?,
                name.as_str(),
            ))
        })
        .collect();
    spans.sort_unstable();
    let lacking: Vec<&str> = {
        let mut v: Vec<&str> = expected.filter(|n| !header.contains_key(*n)).collect();
        v.sort_unstable();
        v
    };
    let mut end = 0;
    for &(start, stop, name) in &spans {
        let problem = if stop < start {
            format!("tensor `{name}` ends (byte {stop}) before it starts (byte {start})")
        } else if start > end {
            format!(
                "bytes {end}..{start} of the data section belong to no tensor in the header \
                 (the next one is `{name}`): a tensor is missing from the header"
            )
        } else if start < end {
            format!(
                "tensor `{name}` starts at byte {start}, inside the previous tensor (which ends at \
                 byte {end}): the header's offsets overlap"
            )
        } else {
            end = stop;
            continue;
        };
        return Some(if lacking.is_empty() {
            problem
        } else {
            format!(
                "{problem}; the index places {} in this file",
                names(&lacking)
            )
        });
    }
    None
}

fn names(list: &[&str]) -> String {
    let quoted: Vec<String> = list.iter().map(|n| format!("`{n}`")).collect();
    quoted.join(", ")
}

impl Checkpoint {
    /// Opens `dir`: reads the index if there is one (mapping no shard yet), else the single file.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            weight_map: HashMap::new(),
            shards: Mutex::new(HashMap::new()),
            fp8_block: [128, 128],
            quantized: false,
            weights: WeightFormat::AsStored,
        };
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io(&index_path, e))?;
            let index: IndexFile =
                serde_json::from_str(&text).map_err(|e| EngineError::Checkpoint {
                    path: index_path.clone(),
                    reason: format!("invalid index: {e}"),
                })?;
            for file in index.weight_map.values() {
                if file.contains('/') || file.contains("..") {
                    return Err(EngineError::Checkpoint {
                        path: index_path,
                        reason: format!("shard name {file:?} must be a plain file name"),
                    });
                }
            }
            checkpoint.weight_map = index.weight_map;
        } else if single_path.exists() {
            let shard = checkpoint.open_shard(SINGLE_FILE)?;
            checkpoint.weight_map = shard
                .tensors
                .keys()
                .map(|k| (k.clone(), SINGLE_FILE.to_string()))
                .collect();
        } else {
            return Err(EngineError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            });
        }
        let config_path = dir.join("config.json");
        if let Ok(text) = std::fs::read_to_string(&config_path)
            && let Ok(q) = serde_json::from_str::<QuantConfigFile>(&text)
            && let Some(quant) = q.quantization_config
        {
            checkpoint.quantized = true;
            if let Some(block) = quant.weight_block_size {
                if block[0] == 0 || block[1] == 0 {
                    return Err(EngineError::config(
                        "quantization_config.weight_block_size",
                        format!("must be positive, got {block:?}"),
                    ));
                }
                checkpoint.fp8_block = block;
            }
        }
        Ok(checkpoint)
    }

    /// Opens a single safetensors file that is not a model directory (e.g. a logits dump).
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        let (dir, file) = match (path.parent(), path.file_name().and_then(|f| f.to_str())) {
            (Some(d), Some(f)) => (d, f.to_string()),
            _ => {
                return Err(EngineError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: "not a file path".into(),
                });
            }
        };
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            weight_map: HashMap::new(),
            shards: Mutex::new(HashMap::new()),
            fp8_block: [128, 128],
            quantized: false,
            weights: WeightFormat::AsStored,
        };
        let shard = checkpoint.open_shard(&file)?;
        checkpoint.weight_map = shard
            .tensors
            .keys()
            .map(|k| (k.clone(), file.clone()))
            .collect();
        Ok(checkpoint)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard file that holds `name`, from the index alone (no file is opened).
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.weight_map.get(name).map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }

    /// Number of shard files mapped so far (tests use it to show a subset load stays narrow).
    pub fn shards_opened(&self) -> usize {
        self.shards.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn open_shard(&self, file: &str) -> Result<Arc<Shard>> {
        if let Some(shard) = self.shards.lock().ok().and_then(|s| s.get(file).cloned()) {
            return Ok(shard);
        }
        let path = self.dir.join(file);
        let handle = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
        // SAFETY: checkpoint files are treated as immutable while mapped; a concurrent writer
        // would be an operator error, as with every mmap-based loader.
        let mmap = unsafe { Mmap::map(&handle) }.map_err(|e| EngineError::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
            let expected = self
                .weight_map
                .iter()
                .filter(|(_, f)| f.as_str() == file)
                .map(|(name, _)| name.as_str());
            let detail = match e {
                safetensors::SafeTensorError::InvalidOffset(_) => offset_gap(&mmap, expected),
                _ => None,
            };
            EngineError::Checkpoint {
                path: path.clone(),
                reason: format!(
                    "not a valid safetensors file (truncated or corrupt?): {}",
                    detail.unwrap_or_else(|| e.to_string())
                ),
            }
        })?;
        let base = mmap.as_ptr() as usize;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
                EngineError::TensorMismatch {
                    name: name.clone(),
                    expected: "dtype f32, bf16, f16 or fp8-e4m3".into(),
                    found: format!("{:?}", view.dtype()),
                }
            })?;
            let start = view.data().as_ptr() as usize - base;
            let range = start..start + view.data().len();
            tensors.insert(name, (dtype, view.shape().to_vec(), range));
        }
        drop(st);
        let shard = Arc::new(Shard { mmap, tensors });
        if let Ok(mut shards) = self.shards.lock() {
            shards.insert(file.to_string(), shard.clone());
        }
        Ok(shard)
    }

    fn locate(&self, name: &str) -> Result<Located> {
        let file = self
            .weight_map
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let shard = self.open_shard(file).map_err(|e| EngineError::Checkpoint {
            path: self.dir.join(file),
            reason: format!("cannot read tensor `{name}`: {e}"),
        })?;
        let (dtype, shape, range) =
            shard
                .tensors
                .get(name)
                .cloned()
                .ok_or_else(|| EngineError::Checkpoint {
                    path: self.dir.join(file),
                    reason: format!("the index places tensor `{name}` here but the file lacks it"),
                })?;
        Ok((shard, dtype, shape, range))
    }

    pub fn info(&self, name: &str) -> Result<TensorInfo> {
        let (_, dtype, shape, _) = self.locate(name)?;
        Ok(TensorInfo {
            dtype,
            shape,
            file: self.weight_map.get(name).cloned().unwrap_or_default(),
        })
    }

    /// Loads `name`, checking its shape, into `precision`. FP8 weights are dequantised with
    /// `{name}_scale_inv`.
    pub fn load(&self, name: &str, shape: &[usize], precision: Precision) -> Result<Tensor> {
        let (shard, dtype, found_shape, range) = self.locate(name)?;
        if found_shape != shape {
            return Err(EngineError::TensorMismatch {
                name: name.to_string(),
                expected: format!("shape {shape:?}"),
                found: format!("shape {found_shape:?}"),
            });
        }
        let bytes = &shard.mmap[range.clone()];
        let tensor = if dtype == DType::F8E4M3 {
            self.load_fp8(name, shape, bytes, precision)
        } else {
            match precision {
                Precision::F32 => {
                    let mut data = Vec::with_capacity(bytes.len() / dtype.size_in_bytes());
                    dtype::decode_to_f32(dtype, bytes, &mut data);
                    Tensor::from_f32(shape, data)
                }
                Precision::Bf16 => {
                    let mut data = Vec::with_capacity(bytes.len() / dtype.size_in_bytes());
                    dtype::decode_to_bf16(dtype, bytes, &mut data);
                    Tensor::from_bf16(shape, data)
                }
            }
        };
        shard.release(range);
        tensor
    }

    /// Loads a weight in the precision it is stored in: f32 stays f32, everything else becomes
    /// bf16 (what the decode kernels stream fastest).
    pub fn load_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (_, dtype, _, _) = self.locate(name)?;
        let precision = if dtype == DType::F32 {
            Precision::F32
        } else {
            Precision::Bf16
        };
        self.load(name, shape, precision)
    }

    /// Sets how FP8 linear weights are held from now on. [`WeightFormat::Fp8`] is refused
    /// for a checkpoint without a `quantization_config` and on a CPU without AVX512-BF16.
    pub fn set_weight_format(&mut self, format: WeightFormat) -> Result<()> {
        if format == WeightFormat::Fp8 {
            if !self.quantized {
                return Err(EngineError::input(
                    "weight-dtype",
                    format!(
                        "fp8 keeps an FP8 checkpoint's weights FP8, but {} has no \
                         quantization_config (its weights are not FP8; quantising at load is \
                         not done): use bf16, or a checkpoint made with `synth --dtype fp8`",
                        self.dir.join("config.json").display()
                    ),
                ));
            }
            if !crate::cpu::matmul::fp8_kernels_available() {
                return Err(EngineError::input(
                    "weight-dtype",
                    format!(
                        "fp8 needs AVX512-BF16 and AVX512-VBMI for its kernels; this CPU's \
                         kernels are {}: use bf16",
                        crate::cpu::matmul::kernels()
                    ),
                ));
            }
        }
        self.weights = format;
        Ok(())
    }

    /// Loads the weight of a linear layer `[out, in]`: an FP8 one stays FP8 (packed for the
    /// kernels, with its block scales) when the weight format allows and this CPU can, and is
    /// otherwise [`load_weight`](Self::load_weight)'s bf16.
    pub fn load_linear(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let keep = match self.weights {
            WeightFormat::Bf16 => false,
            WeightFormat::Fp8 => true,
            WeightFormat::AsStored => crate::cpu::matmul::fp8_kernels_available(),
        };
        let (shard, dtype, found_shape, range) = self.locate(name)?;
        let &[rows, cols] = shape else {
            return self.load_weight(name, shape);
        };
        if !keep || dtype != DType::F8E4M3 || found_shape != shape {
            return self.load_weight(name, shape);
        }
        let [br, bc] = self.fp8_block;
        let scale_shape = [rows.div_ceil(br), cols.div_ceil(bc)];
        let scales = self.load(&format!("{name}_scale_inv"), &scale_shape, Precision::F32)?;
        let bytes = &shard.mmap[range.clone()];
        let packed = PackedFp8::pack(bytes, rows, cols, scales.as_f32()?, self.fp8_block);
        shard.release(range);
        match packed {
            Ok(w) => Ok(Tensor::from_fp8_packed(w)),
            // Blocks the kernels cannot scale tile by tile: as stored means bf16 then.
            Err(Fp8PackError::Block(_)) if self.weights == WeightFormat::AsStored => {
                self.load_weight(name, shape)
            }
            Err(e) => Err(EngineError::TensorMismatch {
                name: name.to_string(),
                expected: "FP8 codes the kernels can keep FP8".into(),
                found: e.to_string(),
            }),
        }
    }

    fn load_fp8(
        &self,
        name: &str,
        shape: &[usize],
        bytes: &[u8],
        precision: Precision,
    ) -> Result<Tensor> {
        let [rows, cols] = shape else {
            return Err(EngineError::TensorMismatch {
                name: name.to_string(),
                expected: "a rank-2 fp8 weight".into(),
                found: format!("shape {shape:?}"),
            });
        };
        let scale_name = format!("{name}_scale_inv");
        let [br, bc] = self.fp8_block;
        let scale_shape = [rows.div_ceil(br), cols.div_ceil(bc)];
        let scales = self.load(&scale_name, &scale_shape, Precision::F32)?;
        let scales = scales.as_f32()?;
        let mut out = vec![0.0f32; rows * cols];
        for r in 0..*rows {
            let srow = &scales[(r / br) * scale_shape[1]..(r / br + 1) * scale_shape[1]];
            let row = &bytes[r * cols..(r + 1) * cols];
            for (c, (&b, o)) in row
                .iter()
                .zip(&mut out[r * cols..(r + 1) * cols])
                .enumerate()
            {
                *o = dtype::f8e4m3_to_f32(b) * srow[c / bc];
            }
        }
        match precision {
            Precision::F32 => Tensor::from_f32(shape, out),
            Precision::Bf16 => {
                Tensor::from_bf16(shape, out.into_iter().map(bf16::from_f32).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn write(path: &Path, tensors: Vec<(&str, DType, Vec<usize>, Vec<u8>)>) {
        let views: BTreeMap<String, safetensors::tensor::TensorView<'_>> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(d.to_safetensors(), s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn fp8_dequantises_with_partial_edge_blocks() {
        let dir = tempfile::tempdir().unwrap();
        // A 130 x 3 weight with 128 x 2 blocks: scale shape [2, 2], edge blocks partial in both
        // dimensions.
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"quantization_config": {"weight_block_size": [128, 2]}}"#,
        )
        .unwrap();
        let (rows, cols) = (130usize, 3usize);
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| [0x38u8, 0x40, 0xb8, 0x3c][i % 4])
            .collect();
        let scales = [0.5f32, 2.0, 4.0, 8.0];
        write(
            &dir.path().join(SINGLE_FILE),
            vec![
                ("w.weight", DType::F8E4M3, vec![rows, cols], codes.clone()),
                (
                    "w.weight_scale_inv",
                    DType::F32,
                    vec![2, 2],
                    f32_bytes(&scales),
                ),
            ],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let t = ck.load("w.weight", &[rows, cols], Precision::F32).unwrap();
        let data = t.as_f32().unwrap();
        // Hand-computed: 0x38 = 1.0, 0x40 = 2.0, 0xb8 = -1.0, 0x3c = 1.5.
        let value = |i: usize| [1.0f32, 2.0, -1.0, 1.5][i % 4];
        for (r, c, block) in [(0, 0, 0), (0, 2, 1), (127, 1, 0), (128, 0, 2), (129, 2, 3)] {
            let i = r * cols + c;
            assert_eq!(data[i], value(i) * scales[block], "({r}, {c})");
        }
    }

    #[test]
    fn missing_tensor_wrong_shape_and_missing_scale_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(SINGLE_FILE),
            vec![
                ("a", DType::F32, vec![2, 2], f32_bytes(&[1., 2., 3., 4.])),
                ("q.weight", DType::F8E4M3, vec![2, 2], vec![0x38; 4]),
            ],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let err = ck
            .load("b", &[2, 2], Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`b`") && err.contains("missing"), "{err}");
        let err = ck.load("a", &[4], Precision::F32).unwrap_err().to_string();
        assert!(
            err.contains("`a`") && err.contains("[4]") && err.contains("[2, 2]"),
            "{err}"
        );
        let err = ck
            .load("q.weight", &[2, 2], Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q.weight_scale_inv"), "{err}");
    }

    #[test]
    fn f16_and_bf16_tensors_decode_to_the_same_values() {
        let dir = tempfile::tempdir().unwrap();
        let values = [1.5f32, -0.25, 3.0, 0.0];
        let f16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        write(
            &dir.path().join(SINGLE_FILE),
            vec![
                ("h", DType::F16, vec![4], f16),
                ("b", DType::Bf16, vec![4], bf16),
            ],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        for name in ["h", "b"] {
            assert_eq!(
                ck.load(name, &[4], Precision::F32)
                    .unwrap()
                    .as_f32()
                    .unwrap(),
                &values
            );
            let as_bf16 = ck.load(name, &[4], Precision::Bf16).unwrap();
            assert_eq!(as_bf16.to_f32().as_f32().unwrap(), &values);
        }
        let err = ck
            .load("h", &[2, 2], Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`h`"), "{err}");
    }

    #[test]
    fn unsupported_dtype_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let views = std::collections::BTreeMap::from([(
            "ids".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &[0u8; 8])
                .unwrap(),
        )]);
        safetensors::serialize_to_file(views, None, &dir.path().join(SINGLE_FILE)).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("`ids`") && err.contains("I64"), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write(
            &path,
            vec![("a", DType::F32, vec![64], f32_bytes(&[1.0; 64]))],
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("truncated or corrupt"), "{err}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Checkpoint::open(dir.path()).is_err());
    }

    /// Rewrites the JSON header of the safetensors file at `path` with `edit`, keeping the data.
    fn edit_header(
        path: &Path,
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) {
        let bytes = std::fs::read(path).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        edit(&mut header);
        let mut text = serde_json::to_vec(&header).unwrap();
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&bytes[8 + len..]);
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn tensor_removed_from_header_is_named_not_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("s.safetensors");
        write(
            &shard,
            vec![
                ("a", DType::F32, vec![4], f32_bytes(&[1.0; 4])),
                ("b", DType::F32, vec![4], f32_bytes(&[2.0; 4])),
                ("c", DType::F32, vec![4], f32_bytes(&[3.0; 4])),
            ],
        );
        edit_header(&shard, |h| {
            h.remove("b");
        });
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map": {"a": "s.safetensors", "b": "s.safetensors", "c": "s.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let err = ck.load("a", &[4], Precision::F32).unwrap_err().to_string();
        assert!(
            err.contains("bytes 16..32") && err.contains("index places `b`"),
            "{err}"
        );
        // Without an index the hole is still named, before the tensor that follows it.
        std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        std::fs::rename(&shard, dir.path().join(SINGLE_FILE)).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("bytes 16..32") && err.contains("next one is `c`"),
            "{err}"
        );
        // Overlapping offsets are named as such.
        edit_header(&dir.path().join(SINGLE_FILE), |h| {
            h["c"]["data_offsets"] = serde_json::json!([8, 24]);
        });
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("overlap") && err.contains("`c`"), "{err}");
    }

    #[test]
    fn sharded_checkpoint_opens_only_the_shards_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("a.safetensors"),
            vec![("x", DType::F32, vec![1], f32_bytes(&[1.0]))],
        );
        write(
            &dir.path().join("b.safetensors"),
            vec![("y", DType::Bf16, vec![1], vec![0x80, 0x3f])],
        );
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "gone.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.shards_opened(), 0);
        let y = ck.load("y", &[1], Precision::F32).unwrap();
        assert_eq!(y.as_f32().unwrap(), &[1.0]);
        assert_eq!(ck.shards_opened(), 1);
        let err = ck.load("z", &[1], Precision::F32).unwrap_err().to_string();
        assert!(
            err.contains("`z`") && err.contains("gone.safetensors"),
            "{err}"
        );
    }
}
