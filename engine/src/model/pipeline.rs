//! Micro-batches: how a step's sequences are split so one micro-batch's routed experts can be
//! in flight while another's attention runs (the schedule itself is `CausalLm::forward_with`).

/// How many micro-batches a step of sequences of `lens` tokens runs as: `k` when it has at
/// least `min_tokens` tokens in all (0: any step), otherwise 1 (and never more than one per
/// sequence, which `split_balanced` enforces).
pub fn micro_batches_for(lens: &[usize], k: usize, min_tokens: usize) -> usize {
    if lens.iter().sum::<usize>() >= min_tokens {
        k.max(1)
    } else {
        1
    }
}

/// Splits sequences of `lens` tokens, in order, into at most `k` contiguous groups of about
/// equal token counts, none empty: the sizes of the groups (summing to `lens.len()`).
pub fn split_balanced(lens: &[usize], k: usize) -> Vec<usize> {
    let n = lens.len();
    let k = k.clamp(1, n.max(1));
    if n == 0 {
        return Vec::new();
    }
    let total: usize = lens.iter().sum();
    let mut sizes = Vec::with_capacity(k);
    let (mut start, mut acc) = (0, 0);
    for j in 1..k {
        // The cut nearest j/k of the tokens, leaving one sequence at least for each group after.
        let target = total * j / k;
        let last = n - (k - j);
        let mut end = start + 1;
        acc += lens[start];
        while end < last && acc + lens[end] / 2 < target {
            acc += lens[end];
            end += 1;
        }
        sizes.push(end - start);
        start = end;
    }
    sizes.push(n - start);
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_contiguous_non_empty_and_cover_every_sequence() {
        for (lens, k) in [
            (vec![1; 8], 2),
            (vec![5, 1, 1, 1, 1, 1], 2),
            (vec![1, 1, 1], 5),
            (vec![7], 2),
            (vec![100, 1, 1, 1, 100, 1], 3),
        ] {
            let sizes = split_balanced(&lens, k);
            assert_eq!(sizes.iter().sum::<usize>(), lens.len(), "{lens:?} / {k}");
            assert!(sizes.iter().all(|&s| s > 0), "{sizes:?}");
            assert!(sizes.len() <= k.min(lens.len()));
        }
        assert!(split_balanced(&[], 2).is_empty());
    }

    #[test]
    fn small_steps_run_whole_and_large_ones_split() {
        // 32 decodes under a 256-token threshold: whole; 32 prefill chunks of 8: split.
        assert_eq!(micro_batches_for(&[1; 32], 2, 256), 1);
        assert_eq!(micro_batches_for(&[8; 32], 2, 256), 2);
        // No threshold: any step of sequences splits.
        assert_eq!(micro_batches_for(&[1, 1], 2, 0), 2);
        assert_eq!(micro_batches_for(&[1; 4], 0, 0), 1);
    }

    #[test]
    fn token_counts_are_balanced() {
        assert_eq!(split_balanced(&[1; 8], 2), vec![4, 4]);
        assert_eq!(split_balanced(&[1; 9], 3), vec![3, 3, 3]);
        // One long prefill chunk and five decodes: the chunk alone against the rest.
        assert_eq!(split_balanced(&[5, 1, 1, 1, 1, 1], 2), vec![1, 5]);
        assert_eq!(split_balanced(&[1, 1, 1, 1, 1, 5], 2), vec![5, 1]);
        assert_eq!(split_balanced(&[3], 1), vec![1]);
    }
}
