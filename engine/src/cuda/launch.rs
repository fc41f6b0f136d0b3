//! Every kernel of `kernels.cu`, declared once with its parameters: the list the device loads,
//! one typed launcher per kernel (`gpu.launch().<name>(cfg, …)`), and the C signatures a test checks
//! against the source, so a launch cannot pass arguments in another order, number or type
//! than the kernel takes (NVRTC cannot see the launch sites, and a mismatch would only show
//! on a device as wrong numbers).
//!
//! Parameter kinds: `[mut T]` a device buffer the kernel writes (`T*`), `[T]` one it reads
//! (`const T*`), `T` a scalar; `T` is `f32`, `i32` or `u16` (bf16 bits).

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::{Gpu, device_err};
use crate::error::Result;

/// The typed launchers of one device's kernels ([`Gpu::launch`]).
pub(crate) struct Launch<'a>(&'a Gpu);

impl Gpu {
    /// This device's kernels, one typed launcher each.
    pub(crate) fn launch(&self) -> Launch<'_> {
        Launch(self)
    }
}

/// A parameter's type at the launch site.
macro_rules! host_type {
    ([mut $t:ident]) => { &mut CudaSlice<$t> };
    ([$t:ident]) => { &CudaSlice<$t> };
    ($t:ident) => { $t };
}

/// A parameter's type in the CUDA source.
#[cfg(test)]
macro_rules! c_type {
    ([mut $t:ident]) => {
        concat!(c_type!($t), "*")
    };
    ([$t:ident]) => {
        concat!("const ", c_type!($t), "*")
    };
    (f32) => {
        "float"
    };
    (i32) => {
        "int"
    };
    (u16) => {
        "unsigned short"
    };
}

/// Pushes one argument: buffers are passed as the references they are, scalars by reference
/// to the launcher's copy.
macro_rules! push_arg {
    ($b:ident, [$($kind:tt)*], $arg:ident) => {
        $b.arg($arg)
    };
    ($b:ident, $t:ident, $arg:ident) => {
        $b.arg(&$arg)
    };
}

macro_rules! kernels {
    ($( $(#[$doc:meta])* $name:ident ( $( $arg:ident : $kind:tt ),* $(,)? ); )*) => {
        /// Every kernel the host launches, as named in [`KERNEL_SOURCE`](crate::cuda::KERNEL_SOURCE).
        pub const KERNEL_NAMES: &[&str] = &[$( stringify!($name) ),*];

        /// Each kernel's parameter types as the CUDA source declares them.
        #[cfg(test)]
        const KERNEL_SIGNATURES: &[(&str, &[&str])] =
            &[$( (stringify!($name), &[$( c_type!($kind) ),*]) ),*];

        /// The loaded kernels.
        #[derive(Debug)]
        pub(crate) struct Kernels {
            $( $name: CudaFunction, )*
        }

        impl Kernels {
            pub(crate) fn load(module: &std::sync::Arc<CudaModule>, ordinal: usize) -> Result<Kernels> {
                Ok(Kernels {
                    $( $name: module
                        .load_function(stringify!($name))
                        .map_err(|e| device_err(ordinal, concat!("kernel ", stringify!($name)), e))?, )*
                })
            }
        }

        impl Launch<'_> {
            $(
                $(#[$doc])*
                ///
                /// # Safety
                /// The buffers must hold every element the kernel reads and writes under `cfg`.
                #[allow(clippy::too_many_arguments)]
                pub(crate) unsafe fn $name(
                    &self,
                    cfg: LaunchConfig,
                    $( $arg: host_type!($kind) ),*
                ) -> Result<()> {
                    let gpu = self.0;
                    let mut b = gpu.stream().launch_builder(&gpu.kernels.$name);
                    $( push_arg!(b, $kind, $arg); )*
                    // SAFETY: guaranteed by the caller.
                    unsafe { b.launch(cfg) }.map_err(|e| gpu.err(stringify!($name), e))?;
                    Ok(())
                }
            )*
        }
    };
}

kernels! {
    /// `out[r, :] = x[rows[r], :]`, bf16 rows.
    gather_rows_bf16(x: [u16], rows: [i32], out: [mut u16], n: i32, h: i32);
    /// Gated activation of `[n, 2 · inter]` gate-then-up rows into bf16 `[n, inter]`.
    glu_bf16(gu: [f32], out: [mut u16], n: i32, inter: i32, gelu: i32);
    /// The same into f32.
    glu_f32(gu: [f32], out: [mut f32], n: i32, inter: i32, gelu: i32);
    /// Each token's weighted sum of its expert rows (CSR over tokens).
    combine_rows(
        y: [f32],
        offsets: [i32],
        idx: [i32],
        w: [f32],
        out: [mut f32],
        tokens: i32,
        h: i32,
    );
    /// RMSNorm of each `dim`-wide row in place, one block per row.
    rms_norm_f32(x: [mut f32], weight: [f32], dim: i32, eps: f32);
    /// RoPE over dims `offset .. offset + 2 · half` of every head, in place.
    rope_f32(
        x: [mut f32],
        positions: [i32],
        inv_freq: [f32],
        tokens: i32,
        heads: i32,
        stride: i32,
        offset: i32,
        half: i32,
        factor: f32,
        interleaved: i32,
    );
    /// Scaled rows of a bf16 embedding table, as f32.
    embed_bf16(table: [u16], ids: [i32], out: [mut f32], n: i32, h: i32, scale: f32);
    /// The MoE gate's selection, one thread per token.
    route_topk(
        logits: [f32],
        bias: [f32],
        has_bias: i32,
        tokens: i32,
        experts: i32,
        k: i32,
        softmax: i32,
        group_mode: i32,
        n_group: i32,
        topk_group: i32,
        norm: i32,
        scaling: f32,
        ids: [mut i32],
        weights: [mut f32],
    );
    /// The first maximum of each row, one block per row.
    argmax_rows(logits: [f32], vocab: i32, ids: [mut i32]);
    /// `softmax(x / temperature)` of each row in place, one block per row.
    softmax_rows(x: [mut f32], vocab: i32, temperature: f32);
    /// MLA decode attention over the paged latent cache, one block per (head, sequence).
    mla_decode(
        q_abs: [f32],
        q_pe: [f32],
        cache: [f32],
        tables: [i32],
        ctx_lens: [i32],
        scratch: [mut f32],
        out: [mut f32],
        heads: i32,
        rank: i32,
        rope: i32,
        block: i32,
        max_blocks: i32,
        max_ctx: i32,
        scale: f32,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::KERNEL_SOURCE;

    /// The parameter types of each `extern "C" __global__` function in `source`, in order
    /// (whitespace normalised, parameter names dropped).
    fn source_signatures(source: &str) -> Vec<(String, Vec<String>)> {
        const MARK: &str = "extern \"C\" __global__ void ";
        let mut out = Vec::new();
        let mut rest = source;
        while let Some(at) = rest.find(MARK) {
            rest = &rest[at + MARK.len()..];
            let Some(open) = rest.find('(') else { break };
            let Some(close) = rest.find(')') else { break };
            let name = rest[..open].trim().to_string();
            let params = rest[open + 1..close]
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    let words: Vec<&str> = p.split_whitespace().collect();
                    // Drop the parameter's name; a `*` glued to it belongs to the type.
                    let (ty, last) = words.split_at(words.len().saturating_sub(1));
                    let mut ty = ty.join(" ");
                    let stars = last
                        .first()
                        .map_or(0, |w| w.chars().take_while(|&c| c == '*').count());
                    ty.push_str(&"*".repeat(stars));
                    ty.replace(" *", "*")
                })
                .collect();
            out.push((name, params));
            rest = &rest[close..];
        }
        out
    }

    /// The launchers pass exactly the parameters the kernels declare, in order and type.
    #[test]
    fn launchers_match_the_kernel_signatures_in_the_source() {
        let source = source_signatures(KERNEL_SOURCE);
        let declared: Vec<(String, Vec<String>)> = KERNEL_SIGNATURES
            .iter()
            .map(|(n, p)| (n.to_string(), p.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(declared, source);
    }

    #[test]
    fn source_signatures_read_types_and_drop_names() {
        let src = "extern \"C\" __global__ void f(const float* a, int *b,\n  unsigned short c) {}\n\
                   __device__ int g(int x) {}\nextern \"C\" __global__ void h() {}";
        assert_eq!(
            source_signatures(src),
            vec![
                (
                    "f".to_string(),
                    vec![
                        "const float*".into(),
                        "int*".into(),
                        "unsigned short".into()
                    ]
                ),
                ("h".to_string(), vec![]),
            ]
        );
    }
}
