//! Merged-index lookup rate: 10 layers of 100 000 extents each, folded into one index of about
//! 1 M extents, probed at random offsets on one core. Target: ≥ 10 M lookups/s.

use blockfmt::format::{Extent, ExtentKind};
use blockfmt::MergedIndex;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};

const LAYERS: usize = 10;
const PER_LAYER: usize = 100_000;

fn layer(rng: &mut StdRng, disk: u64) -> Vec<Extent> {
    let mut starts: Vec<u64> = (0..PER_LAYER)
        .map(|_| rng.gen_range(0..disk / 4096) * 4096)
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let mut out = Vec::with_capacity(starts.len());
    let mut next = 0;
    for s in starts {
        if s < next {
            continue;
        }
        let len = 4096 * rng.gen_range(1..8u32);
        out.push(Extent {
            logical: s,
            len,
            kind: ExtentKind::Data,
            chunk: (s >> 17) as u32,
            chunk_offset: 0,
        });
        next = s + len as u64;
    }
    out
}

fn bench(c: &mut Criterion) {
    let disk = 64u64 << 30;
    let mut rng = StdRng::seed_from_u64(1);
    let layers: Vec<Vec<Extent>> = (0..LAYERS).map(|_| layer(&mut rng, disk)).collect();
    let refs: Vec<&[Extent]> = layers.iter().map(|l| l.as_slice()).collect();
    let t = std::time::Instant::now();
    let idx = MergedIndex::build(&refs).expect("build");
    eprintln!(
        "merged {} layers into {} extents in {:?}",
        LAYERS,
        idx.len(),
        t.elapsed()
    );
    let probes: Vec<u64> = (0..1 << 20).map(|_| rng.gen_range(0..disk)).collect();
    let mut g = c.benchmark_group("merged_index");
    g.throughput(Throughput::Elements(probes.len() as u64));
    g.bench_function("lookup_random_1M_extents", |b| {
        b.iter(|| {
            let mut hits = 0u64;
            for &p in &probes {
                hits += idx.lookup(black_box(p)).is_some() as u64;
            }
            hits
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
