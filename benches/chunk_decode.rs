//! Chunk decode throughput on real data (files from /usr/share) cut into default-size chunks at
//! the default level: zstd alone, decode with crc32c (what `Verify::CrcOnly` does), and decode
//! with crc32c + sha256 (the default). `benches/decode-vs-zstd.sh` runs `zstd -b` on the same
//! bytes for the comparison.

use blockfmt::chunk::{self, Compression, Verify};
use blockfmt::format::ChunkEntry;
use blockfmt::writer::DEFAULT_CHUNK_SIZE;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let sample = lsm_benches::real_sample(64 << 20);
    let out = std::env::var_os("LSM_BENCH_SAMPLE").unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-sample.bin").into()
    });
    if std::fs::write(&out, &sample).is_ok() {
        eprintln!(
            "sample of {} bytes written to {}",
            sample.len(),
            out.to_string_lossy()
        );
    }
    let chunks: Vec<(Vec<u8>, ChunkEntry)> = sample
        .chunks(DEFAULT_CHUNK_SIZE as usize)
        .map(|raw| chunk::encode(raw, Compression::default()).expect("encode"))
        .collect();
    let stored: usize = chunks.iter().map(|c| c.0.len()).sum();
    eprintln!(
        "{} chunks, ratio {:.3}",
        chunks.len(),
        sample.len() as f64 / stored as f64
    );
    let mut g = c.benchmark_group("chunk_decode");
    g.throughput(Throughput::Bytes(sample.len() as u64));
    g.sample_size(10);
    g.bench_function("zstd_only", |b| {
        let mut buf = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
        b.iter(|| {
            for (s, e) in &chunks {
                if e.codec == blockfmt::format::Codec::Zstd {
                    zstd::bulk::decompress_to_buffer(s, &mut buf[..e.raw_len as usize])
                        .expect("zstd");
                }
            }
        })
    });
    for (name, v) in [
        ("decode_crc32c", Verify::CrcOnly),
        ("decode_crc32c_sha256", Verify::Full),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for (i, (s, e)) in chunks.iter().enumerate() {
                    chunk::decode(e, s, i as u32, "bench", v).expect("decode");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
