//! This machine's memory bandwidth, measured as STREAM's triad does (a = b + s * c over arrays
//! far larger than the caches) on the rayon pool the kernels use. A batch-1 decode step reads
//! every weight once, so its floor is the weights' bytes over this figure (`kvgpt bench`
//! reports each decode figure as a multiple of it).

use rayon::prelude::*;
use std::time::Instant;

const CHUNK: usize = 1 << 16;

/// Bytes per second of the best of `repeats` triads over three f32 arrays of `mib` MiB each,
/// counted as STREAM counts them: two arrays read and one written per pass.
pub fn triad(mib: usize, repeats: usize) -> f64 {
    let n = (mib.max(1) << 20) / 4;
    let b = vec![1.0f32; n];
    let c = vec![2.0f32; n];
    let mut a = vec![0.5f32; n]; // every page written before timing, so none faults in a pass
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).zip(c.par_chunks(CHUNK)).for_each(|((a, b), c)| {
            for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&a);
    }
    assert!(a.iter().step_by(4099).all(|&x| x == 7.0), "triad wrote every element");
    (3 * n * 4) as f64 / best
}

/// Bytes per second of the best of `repeats` passes that only read one f32 array of `mib` MiB
/// (a sum in eight lanes per chunk): the access pattern of a decode step's weights, which are
/// read and never written.
pub fn read(mib: usize, repeats: usize) -> f64 {
    let n = (mib.max(1) << 20) / 4;
    let a = vec![1.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let sum: f32 = a
            .par_chunks(CHUNK)
            .map(|c| {
                let mut lanes = [0f32; 8];
                for c in c.chunks_exact(8) {
                    for i in 0..8 {
                        lanes[i] += c[i];
                    }
                }
                lanes.iter().sum::<f32>()
            })
            .sum();
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(sum as usize, n, "read every element");
    }
    (n * 4) as f64 / best
}

#[cfg(test)]
mod tests {
    #[test]
    fn triad_measures_a_plausible_bandwidth() {
        let bps = super::triad(16, 2);
        // Anything between 100 MB/s and 10 TB/s is a machine; outside that the timing is broken.
        assert!(bps.is_finite() && bps > 1e8 && bps < 1e13, "{bps}");
        let read = super::read(16, 2);
        assert!(read.is_finite() && read > 1e8 && read < 1e13, "{read}");
    }
}
