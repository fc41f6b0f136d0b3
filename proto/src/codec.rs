//! Bytes ↔ f32 activations, with the shape and dtype carried beside the bytes.

use half::bf16;

use crate::v1::{Dtype, Tensor};

fn dtype_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::Bf16 => Some(2),
        Dtype::Unspecified => None,
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("tensor `{field}`: shape {shape:?} needs {expected} bytes of {dtype:?}, got {found}")]
    Length {
        field: String,
        shape: Vec<u64>,
        dtype: Dtype,
        expected: u64,
        found: u64,
    },
    #[error("tensor `{field}`: dtype must be DTYPE_F32 or DTYPE_BF16, got {value}")]
    Dtype { field: String, value: i32 },
    #[error("tensor `{field}`: {bytes} bytes exceeds the limit of {limit}")]
    TooLarge {
        field: String,
        bytes: u64,
        limit: u64,
    },
    #[error("tensor `{field}`: expected shape {expected}, got {found:?}")]
    Shape {
        field: String,
        expected: String,
        found: Vec<u64>,
    },
}

/// Encodes `values` (row-major, `shape`) as `dtype`; bf16 rounds to nearest even.
/// `dtype` `Unspecified` encodes as f32.
pub fn encode(values: &[f32], shape: &[usize], dtype: Dtype) -> Tensor {
    let (data, dtype) = match dtype {
        Dtype::F32 | Dtype::Unspecified => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F32,
        ),
        Dtype::Bf16 => (
            values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            Dtype::Bf16,
        ),
    };
    Tensor {
        shape: shape.iter().map(|&d| d as u64).collect(),
        dtype: dtype as i32,
        data,
    }
}

/// Encodes rows `rows` of `x` (row-major, `width` wide) as one `[rows.len(), width]` tensor of
/// `dtype`, gathering straight into the wire bytes (no intermediate f32 copy).
pub fn encode_rows(x: &[f32], width: usize, rows: &[u32], dtype: Dtype) -> Tensor {
    let dtype = match dtype {
        Dtype::Bf16 => Dtype::Bf16,
        Dtype::F32 | Dtype::Unspecified => Dtype::F32,
    };
    let size = dtype_size(dtype).unwrap_or(4);
    let mut data = Vec::with_capacity(rows.len() * width * size);
    for &r in rows {
        let row = &x[r as usize * width..(r as usize + 1) * width];
        match dtype {
            Dtype::Bf16 => {
                for v in row {
                    data.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            _ => {
                for v in row {
                    data.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    Tensor {
        shape: vec![rows.len() as u64, width as u64],
        dtype: dtype as i32,
        data,
    }
}

/// Checks a wire tensor's dtype, its length against its shape and its size against
/// `max_bytes`; returns its dtype.
fn check(field: &str, t: &Tensor, max_bytes: u64) -> Result<Dtype, CodecError> {
    let found = t.data.len() as u64;
    if found > max_bytes {
        return Err(CodecError::TooLarge {
            field: field.into(),
            bytes: found,
            limit: max_bytes,
        });
    }
    let dtype = Dtype::try_from(t.dtype).unwrap_or(Dtype::Unspecified);
    let Some(size) = dtype_size(dtype) else {
        return Err(CodecError::Dtype {
            field: field.into(),
            value: t.dtype,
        });
    };
    let expected = t
        .shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d));
    if expected != Some(found) {
        return Err(CodecError::Length {
            field: field.into(),
            shape: t.shape.clone(),
            dtype,
            expected: expected.unwrap_or(u64::MAX),
            found,
        });
    }
    Ok(dtype)
}

/// Decodes a wire tensor named `field` into f32, checking its length against its shape and its
/// size against `max_bytes`.
pub fn decode(field: &str, t: &Tensor, max_bytes: u64) -> Result<Vec<f32>, CodecError> {
    Ok(match check(field, t, max_bytes)? {
        Dtype::F32 | Dtype::Unspecified => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::Bf16 => t
            .data
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    })
}

/// Adds a `[rows.len(), width]` wire tensor named `field` into rows `rows` of `dst`
/// (row-major, `width` wide), decoding straight into the sum (no intermediate f32 copy);
/// checked as [`decode`] checks, and its shape against `rows` and `width`.
pub fn add_rows(
    field: &str,
    t: &Tensor,
    max_bytes: u64,
    width: usize,
    rows: &[u32],
    dst: &mut [f32],
) -> Result<(), CodecError> {
    let dtype = check(field, t, max_bytes)?;
    if t.shape[..] != [rows.len() as u64, width as u64] {
        return Err(CodecError::Shape {
            field: field.into(),
            expected: format!("[{}, {width}]", rows.len()),
            found: t.shape.clone(),
        });
    }
    if let Some(&r) = rows.iter().find(|&&r| (r as usize + 1) * width > dst.len()) {
        return Err(CodecError::Shape {
            field: field.into(),
            expected: format!("rows within {} of width {width}", dst.len() / width.max(1)),
            found: vec![u64::from(r)],
        });
    }
    let size = dtype_size(dtype).unwrap_or(4);
    for (j, &r) in rows.iter().enumerate() {
        let src = &t.data[j * width * size..(j + 1) * width * size];
        let out = &mut dst[r as usize * width..(r as usize + 1) * width];
        match dtype {
            Dtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o += bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            _ => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }
    Ok(())
}

/// Checks that `t` is `[rows, width]` for some `rows`; returns `rows`.
pub fn expect_rows(field: &str, t: &Tensor, width: usize) -> Result<usize, CodecError> {
    match t.shape[..] {
        [rows, w] if w == width as u64 => Ok(rows as usize),
        _ => Err(CodecError::Shape {
            field: field.into(),
            expected: format!("[rows, {width}]"),
            found: t.shape.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly() {
        let v = vec![1.0, -2.5, 3.25e-7, f32::MAX];
        let t = encode(&v, &[2, 2], Dtype::F32);
        assert_eq!(t.data.len(), 16);
        assert_eq!(decode("x", &t, 1 << 20).unwrap(), v);
    }

    #[test]
    fn bf16_round_trips_within_rounding() {
        let v: Vec<f32> = (0..64).map(|i| i as f32 * 0.173 - 5.0).collect();
        let t = encode(&v, &[4, 16], Dtype::Bf16);
        assert_eq!(t.data.len(), 128);
        for (a, b) in decode("x", &t, 1 << 20).unwrap().iter().zip(&v) {
            assert!((a - b).abs() <= b.abs() / 256.0 + 1e-6);
        }
    }

    #[test]
    fn gathered_rows_encode_and_add_back_as_encode_and_decode_do() {
        let x: Vec<f32> = (0..5 * 3).map(|i| i as f32 * 0.37 - 2.0).collect();
        let rows = [4u32, 1, 3];
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let gathered: Vec<f32> = rows
                .iter()
                .flat_map(|&r| x[r as usize * 3..(r as usize + 1) * 3].to_vec())
                .collect();
            let t = encode_rows(&x, 3, &rows, dtype);
            assert_eq!(t, encode(&gathered, &[3, 3], dtype), "{dtype:?}");
            let mut sum = vec![1.0f32; 5 * 3];
            add_rows("o", &t, 1 << 20, 3, &rows, &mut sum).unwrap();
            let decoded = decode("o", &t, 1 << 20).unwrap();
            for (j, &r) in rows.iter().enumerate() {
                for c in 0..3 {
                    assert_eq!(sum[r as usize * 3 + c], 1.0 + decoded[j * 3 + c]);
                }
            }
            assert_eq!(&sum[0..3], &[1.0; 3], "row 0 untouched");
            // A reply of the wrong shape, or naming rows past the sum, is an error.
            assert!(add_rows("o", &t, 1 << 20, 3, &rows[..2], &mut sum).is_err());
            assert!(add_rows("o", &t, 1 << 20, 3, &[9, 1, 3], &mut sum).is_err());
            assert!(add_rows("o", &t, 4, 3, &rows, &mut sum).is_err());
        }
    }

    #[test]
    fn wrong_length_names_field_shape_and_sizes() {
        let mut t = encode(&[1.0; 6], &[2, 3], Dtype::Bf16);
        t.data.pop();
        let err = decode("hidden", &t, 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("hidden")
                && err.contains("[2, 3]")
                && err.contains("12")
                && err.contains("11"),
            "{err}"
        );
    }

    #[test]
    fn oversized_and_overflowing_shapes_are_rejected() {
        let t = encode(&[0.0; 8], &[8], Dtype::F32);
        assert!(matches!(
            decode("x", &t, 16),
            Err(CodecError::TooLarge { .. })
        ));
        let t = Tensor {
            shape: vec![u64::MAX, 4],
            dtype: Dtype::F32 as i32,
            data: vec![],
        };
        assert!(matches!(
            decode("x", &t, 16),
            Err(CodecError::Length { .. })
        ));
    }

    #[test]
    fn unknown_dtype_is_named() {
        let mut t = encode(&[0.0; 2], &[2], Dtype::F32);
        t.dtype = 7;
        let err = decode("hidden", &t, 64).unwrap_err().to_string();
        assert!(err.contains("hidden") && err.contains('7'), "{err}");
    }

    #[test]
    fn expect_rows_checks_width() {
        let t = encode(&[0.0; 8], &[2, 4], Dtype::F32);
        assert_eq!(expect_rows("x", &t, 4).unwrap(), 2);
        assert!(expect_rows("x", &t, 3).is_err());
    }
}
