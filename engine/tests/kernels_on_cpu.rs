//! The CUDA kernels (`engine/src/cuda/kernels.cu`) run on the CPU against the CPU ops they
//! mirror, so what they compute is checked on every machine, GPU or not.
//!
//! `tests/cuda_emu/emu.cpp` gives the kernels CUDA's execution model with real threads (a
//! barrier per block for `__syncthreads`, one per warp for `__shfl_xor_sync`); g++ builds it
//! into a shared library here. Without g++ the tests print `SKIPPED` and pass, unless
//! `SWITCHYARD_REQUIRE_KERNEL_EMU` is set (CI sets it). What this cannot check — cuBLAS calls,
//! device memory, launch limits — `engine/tests/gpu.rs` checks on a GPU.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use common::{MlaCase, ROPE_POSITIONS, gate_bias, gate_flavours, max_diff, pseudo};
use half::bf16;
use libloading::{Library, Symbol};
use switchyard_engine::Tensor;
use switchyard_engine::config::{RopeStyle, ScoringFunc, TopkMethod};
use switchyard_engine::cpu::ops;
use switchyard_engine::model::gate::Gate;
use switchyard_engine::sampling::argmax;

/// Threads per block, as the host launches them (`cuda::THREADS`).
const THREADS: u32 = 256;

struct Emu {
    lib: Library,
    _dir: tempfile::TempDir,
}

/// The kernels built for the CPU, or `None` (with the reason printed) where g++ is missing.
fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    let built = EMU.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu/emu.cpp");
        let lib = dir.path().join("libkernels_emu.so");
        let out = Command::new("g++")
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall"])
            .arg(&src)
            .arg("-o")
            .arg(&lib)
            .output()
            .map_err(|e| format!("g++ did not start: {e}"))?;
        if !out.status.success() {
            // A compiler that runs but rejects the kernels is a failure, never a skip.
            panic!(
                "g++ rejected the kernels:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // SAFETY: the library is ours and runs no initialisers beyond C++ statics.
        let lib = unsafe { Library::new(&lib) }.map_err(|e| e.to_string())?;
        Ok(Emu { lib, _dir: dir })
    });
    match built {
        Ok(emu) => Some(emu),
        Err(e) if std::env::var_os("SWITCHYARD_REQUIRE_KERNEL_EMU").is_none() => {
            eprintln!("SKIPPED (no C++ compiler to run the kernels on the CPU): {e}");
            None
        }
        Err(e) => panic!("SWITCHYARD_REQUIRE_KERNEL_EMU is set: {e}"),
    }
}

impl Emu {
    fn kernel<T>(&self, name: &str) -> Symbol<'_, T> {
        // SAFETY: each caller names the type that emu.cpp exports for the kernel.
        unsafe { self.lib.get(format!("emu_{name}").as_bytes()) }.unwrap()
    }
}

/// Blocks of [`THREADS`] for one thread per element.
fn blocks(elements: usize) -> u32 {
    elements.div_ceil(THREADS as usize).max(1) as u32
}

fn bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}

type GatherFn = unsafe extern "C" fn(u32, u32, u32, *const u16, *const i32, *mut u16, i32, i32);
type GluBf16Fn = unsafe extern "C" fn(u32, u32, u32, *const f32, *mut u16, i32, i32, i32);
type GluF32Fn = unsafe extern "C" fn(u32, u32, u32, *const f32, *mut f32, i32, i32, i32);
type CombineFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const f32,
    *const i32,
    *const i32,
    *const f32,
    *mut f32,
    i32,
    i32,
);
type RmsNormFn = unsafe extern "C" fn(u32, u32, u32, *mut f32, *const f32, i32, f32);
type RopeFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *mut f32,
    *const i32,
    *const f32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    i32,
);
type EmbedFn = unsafe extern "C" fn(u32, u32, u32, *const u16, *const i32, *mut f32, i32, i32, f32);
type RouteFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const f32,
    *const f32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *mut i32,
    *mut f32,
);
type ArgmaxFn = unsafe extern "C" fn(u32, u32, u32, *const f32, i32, *mut i32);
type SoftmaxFn = unsafe extern "C" fn(u32, u32, u32, *mut f32, i32, f32);
type MlaFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const f32,
    *const f32,
    *const f32,
    *const i32,
    *const i32,
    *mut f32,
    *mut f32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
);

/// The expert layer's three kernels: gathering rows, SwiGLU to bf16, and each token's
/// weighted sum of its expert rows.
#[test]
fn expert_kernels_gather_activate_and_combine() {
    let Some(emu) = emu() else { return };
    let (tokens, h) = (5usize, 40usize);
    let x = bits(&pseudo(tokens * h, 1));
    let rows = [3i32, 0, 4, 4, 1, 2, 0];
    let n = rows.len();
    let mut out = vec![0u16; n * h];
    let gather = emu.kernel::<GatherFn>("gather_rows_bf16");
    // SAFETY: buffers sized as the kernel reads and writes them.
    unsafe {
        gather(
            blocks(n * h),
            1,
            THREADS,
            x.as_ptr(),
            rows.as_ptr(),
            out.as_mut_ptr(),
            n as i32,
            h as i32,
        )
    };
    for (r, &src) in rows.iter().enumerate() {
        assert_eq!(
            out[r * h..(r + 1) * h],
            x[src as usize * h..(src as usize + 1) * h]
        );
    }

    // The gated activations, SwiGLU and GeGLU, rounded to bf16 or kept in f32: bit for bit
    // the CPU's (same operations in the same order, the same libm).
    let inter = 24;
    let gu: Vec<f32> = pseudo(n * 2 * inter, 2).iter().map(|v| v * 6.0).collect();
    let glu_bf16 = emu.kernel::<GluBf16Fn>("glu_bf16");
    let glu_f32 = emu.kernel::<GluF32Fn>("glu_f32");
    for gelu in [0, 1] {
        let mut want = Vec::with_capacity(n * inter);
        for r in 0..n {
            let mut g = gu[r * 2 * inter..r * 2 * inter + inter].to_vec();
            let u = &gu[r * 2 * inter + inter..(r + 1) * 2 * inter];
            if gelu == 1 {
                ops::gelu_tanh_mul_inplace(&mut g, u);
            } else {
                ops::silu_mul_inplace(&mut g, u);
            }
            want.extend(g);
        }
        let mut act = vec![0u16; n * inter];
        let mut act32 = vec![f32::NAN; n * inter];
        let (grid, n_i, inter_i) = (blocks(n * inter), n as i32, inter as i32);
        // SAFETY: as above.
        unsafe {
            glu_bf16(
                grid,
                1,
                THREADS,
                gu.as_ptr(),
                act.as_mut_ptr(),
                n_i,
                inter_i,
                gelu,
            );
            glu_f32(
                grid,
                1,
                THREADS,
                gu.as_ptr(),
                act32.as_mut_ptr(),
                n_i,
                inter_i,
                gelu,
            );
        };
        assert_eq!(act, bits(&want), "gelu={gelu}");
        assert_eq!(act32, want, "gelu={gelu}");
    }

    // Laid-out rows 0..7; token t sums the rows listed for it.
    let y = pseudo(n * h, 3);
    let w = [0.5f32, 0.25, 2.0, 1.0, 0.125, 4.0, 3.0];
    let offsets = [0i32, 2, 3, 3, 6, 7];
    let idx = [1i32, 6, 4, 5, 0, 2, 3];
    let mut combined = vec![f32::NAN; tokens * h];
    let combine = emu.kernel::<CombineFn>("combine_rows");
    // SAFETY: as above.
    unsafe {
        combine(
            blocks(tokens * h),
            1,
            THREADS,
            y.as_ptr(),
            offsets.as_ptr(),
            idx.as_ptr(),
            w.as_ptr(),
            combined.as_mut_ptr(),
            tokens as i32,
            h as i32,
        )
    };
    for t in 0..tokens {
        for c in 0..h {
            let want: f32 = idx[offsets[t] as usize..offsets[t + 1] as usize]
                .iter()
                .map(|&r| w[r as usize] * y[r as usize * h + c])
                .sum();
            assert_eq!(combined[t * h + c], want, "token {t} col {c}");
        }
    }
    // Token 2 has no experts: zeros, written (not left as they were).
    assert!(combined[2 * h..3 * h].iter().all(|&v| v == 0.0));
}

#[test]
fn rms_norm_kernel_matches_cpu() {
    let Some(emu) = emu() else { return };
    let rms = emu.kernel::<RmsNormFn>("rms_norm_f32");
    for (rows, dim) in [(5usize, 1000usize), (2, 7), (1, 4096)] {
        let mut x = pseudo(rows * dim, dim as u32);
        let w = pseudo(dim, 11);
        let mut want = x.clone();
        ops::rms_norm_inplace(&mut want, &w, 1e-6);
        // SAFETY: one block per row over `dim` elements.
        unsafe {
            rms(
                rows as u32,
                1,
                THREADS,
                x.as_mut_ptr(),
                w.as_ptr(),
                dim as i32,
                1e-6,
            )
        };
        let d = max_diff(&want, &x);
        assert!(d <= 1e-5, "{rows}x{dim}: max |Δ| {d:e}");
    }
}

#[test]
fn rope_kernel_matches_cpu_for_each_layout_and_scaling() {
    let Some(emu) = emu() else { return };
    let kernel = emu.kernel::<RopeFn>("rope_f32");
    let (heads, offset) = (3usize, 2usize);
    for rope in common::rope_cases() {
        let (dim, style) = (rope.dim(), rope.style());
        let stride = offset + dim + 3;
        let tokens = ROPE_POSITIONS.len();
        let mut x = pseudo(tokens * heads * stride, dim as u32);
        let want = common::rope_reference(&rope, &x, heads, stride, offset);
        let half = dim / 2;
        // SAFETY: one thread per (token, head, pair) inside x.
        unsafe {
            kernel(
                blocks(tokens * heads * half),
                1,
                THREADS,
                x.as_mut_ptr(),
                ROPE_POSITIONS.as_ptr(),
                rope.inv_freq().as_ptr(),
                tokens as i32,
                heads as i32,
                stride as i32,
                offset as i32,
                half as i32,
                rope.attention_factor(),
                i32::from(style == RopeStyle::Interleaved),
            )
        };
        let d = max_diff(&want, &x);
        assert!(d <= 1e-5, "{style:?} dim {dim}: max |Δ| {d:e}");
    }
}

#[test]
fn embedding_kernel_reads_scaled_bf16_rows() {
    let Some(emu) = emu() else { return };
    let (vocab, h) = (100usize, 48usize);
    let table = bits(&pseudo(vocab * h, 5));
    let ids = [0i32, 99, 17, 17];
    let scale = (h as f32).sqrt();
    let mut out = vec![0.0f32; ids.len() * h];
    let embed = emu.kernel::<EmbedFn>("embed_bf16");
    // SAFETY: ids < vocab; out holds ids·h.
    unsafe {
        embed(
            blocks(ids.len() * h),
            1,
            THREADS,
            table.as_ptr(),
            ids.as_ptr(),
            out.as_mut_ptr(),
            ids.len() as i32,
            h as i32,
            scale,
        )
    };
    for (r, &id) in ids.iter().enumerate() {
        for c in 0..h {
            let want = bf16::from_bits(table[id as usize * h + c]).to_f32() * scale;
            assert_eq!(out[r * h + c], want);
        }
    }
}

/// Every gate flavour: the CPU gate's experts, in its order, with its weights.
#[test]
fn routing_kernel_matches_cpu_gate_for_every_flavour() {
    let Some(emu) = emu() else { return };
    let route = emu.kernel::<RouteFn>("route_topk");
    let tokens = 37usize;
    for (name, c) in gate_flavours() {
        let e = c.n_routed_experts;
        let k = c.num_experts_per_tok;
        let bias = gate_bias(&c);
        let cpu = Gate::from_parts(
            &c,
            Tensor::from_f32(&[e, 4], pseudo(e * 4, 1)).unwrap(),
            bias.clone(),
        )
        .unwrap();
        let logits: Vec<f32> = pseudo(tokens * e, e as u32)
            .iter()
            .map(|v| v * 4.0)
            .collect();
        let want = cpu.route_logits(&logits);
        let group_mode = match c.topk_method {
            _ if c.n_group <= 1 => 0,
            TopkMethod::Greedy => 0,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoAuxTc => 2,
        };
        let bias_buf = bias.clone().unwrap_or(vec![0.0]);
        let mut ids = vec![-1i32; tokens * k];
        let mut weights = vec![f32::NAN; tokens * k];
        // SAFETY: one thread per token over `e` logits; ids and weights hold tokens·k.
        unsafe {
            route(
                blocks(tokens),
                1,
                THREADS,
                logits.as_ptr(),
                bias_buf.as_ptr(),
                i32::from(bias.is_some()),
                tokens as i32,
                e as i32,
                k as i32,
                i32::from(c.scoring_func == ScoringFunc::Softmax),
                group_mode,
                c.n_group.max(1) as i32,
                c.topk_group as i32,
                i32::from(c.norm_topk_prob),
                c.routed_scaling_factor,
                ids.as_mut_ptr(),
                weights.as_mut_ptr(),
            )
        };
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        assert_eq!(ids, want.ids, "{name}: experts");
        let d = max_diff(&weights, &want.weights);
        assert!(
            d <= 1e-6 * c.routed_scaling_factor,
            "{name}: weights max |Δ| {d:e}"
        );
    }
}

#[test]
fn argmax_and_softmax_kernels_match_cpu() {
    let Some(emu) = emu() else { return };
    let (rows, vocab) = (4usize, 5000usize);
    let mut logits = pseudo(rows * vocab, 13);
    // Ties: the first maximum wins, as on the CPU; a constant row gives id 0.
    logits[17] = 9.0;
    logits[4000] = 9.0;
    logits[vocab + 4999] = 5.0;
    logits[2 * vocab..3 * vocab].fill(-3.0);
    logits[3 * vocab + 10] = f32::NAN;
    let mut ids = vec![-1i32; rows];
    let argmax_k = emu.kernel::<ArgmaxFn>("argmax_rows");
    // SAFETY: one block per row of `vocab` logits.
    unsafe {
        argmax_k(
            rows as u32,
            1,
            THREADS,
            logits.as_ptr(),
            vocab as i32,
            ids.as_mut_ptr(),
        )
    };
    let want: Vec<i32> = logits
        .chunks_exact(vocab)
        .map(|r| argmax(r) as i32)
        .collect();
    assert_eq!(ids, want);
    assert_eq!(&ids[..3], &[17, 4999, 0]);

    logits[3 * vocab + 10] = 0.0;
    let softmax = emu.kernel::<SoftmaxFn>("softmax_rows");
    for temperature in [1.0f32, 0.7] {
        let mut want = logits.clone();
        for row in want.chunks_exact_mut(vocab) {
            row.iter_mut().for_each(|v| *v /= temperature);
            ops::softmax_inplace(row);
        }
        let mut x = logits.clone();
        // SAFETY: one block per row.
        unsafe {
            softmax(
                rows as u32,
                1,
                THREADS,
                x.as_mut_ptr(),
                vocab as i32,
                temperature,
            )
        };
        let d = max_diff(&want, &x);
        // Probabilities up to 0.5 summed in another order: a few ulp of 0.5.
        assert!(d <= 2e-6, "T={temperature}: max |Δ| {d:e}");
    }
}

/// MLA decode over a paged latent cache ([`MlaCase`]) against the CPU's absorbed-form
/// attention.
#[test]
fn mla_decode_kernel_matches_cpu_latent_attention() {
    let Some(emu) = emu() else { return };
    let MlaCase {
        heads,
        rank,
        rope,
        block,
        ctx_lens,
        rows,
        tables,
        q_abs,
        q_pe,
        scale,
        want,
    } = MlaCase::new();
    let seqs = ctx_lens.len();
    let max_blocks = tables.iter().map(Vec::len).max().unwrap();
    let max_ctx = 300;
    let mut flat = vec![0i32; seqs * max_blocks];
    for (s, t) in tables.iter().enumerate() {
        for (j, &b) in t.iter().enumerate() {
            flat[s * max_blocks + j] = b as i32;
        }
    }
    let lens: Vec<i32> = ctx_lens.iter().map(|&c| c as i32).collect();
    let mut scratch = vec![0.0f32; seqs * heads * max_ctx];
    let mut out = vec![f32::NAN; seqs * heads * rank];
    let mla = emu.kernel::<MlaFn>("mla_decode");
    // SAFETY: one block per (head, sequence); tables index blocks < total_blocks.
    unsafe {
        mla(
            heads as u32,
            seqs as u32,
            THREADS,
            q_abs.as_ptr(),
            q_pe.as_ptr(),
            rows.as_ptr(),
            flat.as_ptr(),
            lens.as_ptr(),
            scratch.as_mut_ptr(),
            out.as_mut_ptr(),
            heads as i32,
            rank as i32,
            rope as i32,
            block as i32,
            max_blocks as i32,
            max_ctx as i32,
            scale,
        )
    };
    let d = max_diff(&want, &out);
    assert!(d <= 1e-5, "max |Δ| {d:e}");
}
