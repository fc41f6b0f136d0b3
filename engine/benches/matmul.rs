//! GEMM kernel throughput (`cargo bench -p switchyard-engine --bench matmul`).
//!
//! Decode shapes are memory-bound: the figure that matters is weight bytes streamed per second,
//! compared in the same run against a plain streaming read of the same bytes (the roofline).
//! Where the CPU's kernels are not the portable ones, the run ends by measuring the portable
//! loops too (re-run as a child with `SWITCHYARD_KERNELS=portable`, a few small batches), so
//! the hand-written kernels' gain is one run's ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use switchyard_engine::Tensor;
use switchyard_engine::cpu::matmul_t;

fn stream_read_gbs(words: &[u64], reps: usize) -> f64 {
    let pool = switchyard_engine::cpu::pool::global();
    let chunks = pool.threads() * 8;
    let per = words.len().div_ceil(chunks);
    let sums: Vec<AtomicU64> = (0..chunks).map(|_| AtomicU64::new(0)).collect();
    let start = Instant::now();
    for _ in 0..reps {
        pool.run(chunks, &|c| {
            let part = &words[(c * per).min(words.len())..((c + 1) * per).min(words.len())];
            let mut acc = [0u64; 8];
            for ch in part.chunks_exact(8) {
                for (a, &v) in acc.iter_mut().zip(ch) {
                    *a = a.wrapping_add(v);
                }
            }
            sums[c].fetch_add(acc.iter().sum::<u64>(), Ordering::Relaxed);
        });
    }
    std::hint::black_box(&sums);
    (words.len() * 8 * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Measured peak of the CPU's widest multiply-add for the kernel set in use, in GFLOP/s on
/// every pool thread: independent `vdpbf16ps` (64 FLOP each: 16 lanes × 2 pairs) or
/// f32 FMAs on registers, no memory. The GEMM figures are read against it.
fn peak_gflops(kernels: &str) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let pool = switchyard_engine::cpu::pool::global();
        let iters = 20_000_000u64;
        let flops_per_iter: f64 = match kernels {
            // 16 chains of one 16-lane, 2-pair dot product each: 16 · 16 · 2 · 2.
            "avx512-bf16" => 16.0 * 64.0,
            // 16 chains of a 16-lane FMA.
            "avx512" => 16.0 * 32.0,
            _ => return None,
        };
        let bf16 = kernels == "avx512-bf16";
        let start = Instant::now();
        pool.run(pool.threads(), &|_| {
            // SAFETY: the kernel set named was detected on this CPU.
            let v = unsafe { peak::chains(iters, bf16) };
            std::hint::black_box(v);
        });
        let secs = start.elapsed().as_secs_f64();
        Some(flops_per_iter * iters as f64 * pool.threads() as f64 / secs / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kernels;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// 16 independent accumulator chains: more than any core's latency × throughput, and few
    /// enough to stay in registers (24 spilled).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn chains(iters: u64, bf16: bool) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 16];
        let a = _mm512_set1_ps(1.0e-3);
        let b = _mm512_set1_ps(0.999);
        let ab: __m512bh = _mm512_cvtne2ps_pbh(a, a);
        let bb: __m512bh = _mm512_cvtne2ps_pbh(b, b);
        if bf16 {
            for _ in 0..iters {
                for c in acc.iter_mut() {
                    *c = _mm512_dpbf16_ps(*c, ab, bb);
                }
            }
        } else {
            for _ in 0..iters {
                for c in acc.iter_mut() {
                    *c = _mm512_fmadd_ps(*c, b, a);
                }
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
}

fn main() {
    let kernels = switchyard_engine::cpu::matmul::kernels();
    // In the portable child: the slow loops, on few batch sizes and fewer weights.
    let portable_child = std::env::var_os("SWITCHYARD_KERNELS").is_some();
    // Many distinct weights so each call streams from DRAM, as in decode (321 MB per token).
    let (n, k) = (1024, 1024);
    let copies = if portable_child { 64 } else { 192 }; // 128 / 384 MiB of bf16
    let weights: Vec<Tensor> = (0..copies)
        .map(|c| {
            let data: Vec<f32> = (0..n * k)
                .map(|i| ((i * 31 + c) % 97) as f32 / 97.0 - 0.5)
                .collect();
            Tensor::from_f32(&[n, k], data)
                .expect("shape matches data")
                .to_bf16()
        })
        .collect();
    let flat: Vec<u64> = vec![1u64; n * k * copies / 4];
    let roofline = stream_read_gbs(&flat, 3);
    println!("threads: {}", rayon::current_num_threads());
    println!("streaming read (roofline): {roofline:.1} GB/s");
    println!("amx: {}", switchyard_engine::cpu::matmul::amx_available());
    println!("kernels: {kernels}");
    let peak = peak_gflops(kernels);
    if let Some(p) = peak {
        println!("multiply-add peak (measured, registers only): {p:.1} GFLOP/s");
    }
    let batches: &[usize] = if portable_child {
        &[1, 8, 32]
    } else {
        &[1, 2, 4, 6, 8, 16, 32, 64, 128, 512, 1024]
    };
    let packed: Vec<Tensor> = weights
        .iter()
        .map(|w| w.clone().pack_for_matmul())
        .collect();
    for (layout, weights) in [("row-major", &weights), ("packed", &packed)] {
        if layout == "packed" && !switchyard_engine::cpu::matmul::packed_kernels_available() {
            continue;
        }
        for &m in batches {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0).collect();
            let mut out = vec![0.0f32; m * n];
            let reps = if portable_child { 1 } else { 3 };
            let start = Instant::now();
            for _ in 0..reps {
                for w in weights.iter() {
                    matmul_t(&x, m, w, &mut out).expect("shapes match");
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let calls = (reps * copies) as f64;
            let gbs = (n * k * 2) as f64 * calls / secs / 1e9;
            let gflops = 2.0 * (m * n * k) as f64 * calls / secs / 1e9;
            let of_peak = peak
                .map(|p| format!(" ({:.0}% of peak)", gflops / p * 100.0))
                .unwrap_or_default();
            println!(
                "{kernels:>11} {layout:>9} m={m:>4} n={n} k={k} bf16: {:>8.1} us/call, {gbs:>5.1} GB/s ({:.0}% of roofline), {gflops:>6.1} GFLOP/s{of_peak}",
                secs / calls * 1e6,
                gbs / roofline * 100.0
            );
        }
    }
    if !portable_child && kernels != "portable" {
        println!("-- the portable loops, for comparison:");
        let status = std::env::current_exe().and_then(|exe| {
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env("SWITCHYARD_KERNELS", "portable")
                .status()
        });
        match status {
            Ok(s) if s.success() => {}
            other => eprintln!("the portable run failed: {other:?}"),
        }
    }
}
