//! `--weight-dtype`: how FP8 checkpoint weights are held in memory, one flag for every command
//! that loads weights (`worker`, `router`, `bench`, and `up` / `serve`, which hand it to their
//! nodes through [`ENV`]).

use switchyard_engine::checkpoint::WeightFormat;

/// The variable the flag also reads, and the one `up` sets for the nodes it starts.
pub const ENV: &str = "SWITCHYARD_WEIGHT_DTYPE";

#[derive(clap::Args, Clone, Copy, Debug)]
pub struct WeightArgs {
    /// How an FP8 checkpoint's weights are held: `fp8` keeps them FP8 and widens them inside
    /// the GEMMs (half the memory and decode bytes of bf16; needs AVX512-BF16 and AVX512-VBMI),
    /// `bf16` widens them at load, `auto` keeps them FP8 where this CPU has the kernels and
    /// widens them elsewhere. Weights stored otherwise load as stored; `fp8` refuses a
    /// checkpoint that is not FP8. On a GPU, weights are bf16 whatever this says.
    #[arg(long = "weight-dtype", env = ENV, default_value = "auto", value_name = "fp8|bf16|auto")]
    pub weight_dtype: WeightFormat,
}

impl WeightArgs {
    /// The flag's value as typed.
    pub fn value(&self) -> &'static str {
        match self.weight_dtype {
            WeightFormat::AsStored => "auto",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Fp8 => "fp8",
        }
    }
}
