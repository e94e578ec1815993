//! Crash safety of the upper layer: after cutting its files at any record boundary or any byte
//! past the last flush, reopening keeps every flushed operation and exactly a prefix of the rest.

use std::fs;
use std::path::Path;

use blockfmt::upper::{DATA_FILE, LOG_FILE};
use blockfmt::{Image, LayerStack, UpperLayer};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SIZE: u64 = 256 << 10;

enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Trim(u64, u64),
}

fn apply(model: &mut [u8], op: &Op) {
    match op {
        Op::Write(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Op::Zero(o, l) | Op::Trim(o, l) => model[*o as usize..(*o + *l) as usize].fill(0),
    }
}

fn image_over(dir: &Path) -> (Image, u64) {
    let (up, rec) = UpperLayer::open(dir, SIZE).unwrap();
    (
        Image::new(LayerStack::new(vec![], SIZE, 0).unwrap(), Some(up)).unwrap(),
        rec.replayed,
    )
}

fn content(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    img.read(0, &mut v).unwrap();
    v
}

fn copy_cut(src: &Path, dst: &Path, log_len: u64, data_len: u64) {
    fs::create_dir_all(dst).unwrap();
    for (f, len) in [(LOG_FILE, log_len), (DATA_FILE, data_len)] {
        fs::copy(src.join(f), dst.join(f)).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(dst.join(f))
            .unwrap()
            .set_len(len)
            .unwrap();
    }
}

#[test]
fn flushed_writes_survive_any_cut_and_the_rest_is_a_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("upper");
    let mut rng = StdRng::seed_from_u64(42);
    let mut last_write: Option<(u64, usize)> = None;
    let ops: Vec<Op> = (0..120)
        .map(|_| {
            let o = rng.gen_range(0..SIZE - 20_000);
            match rng.gen_range(0..8) {
                0 => Op::Zero(o, rng.gen_range(1..20_000)),
                1 => Op::Trim(o, rng.gen_range(1..20_000)),
                // Rewrite part of the previous write (its slot dies only piecewise).
                2 | 3 if last_write.is_some() => {
                    let (lo, ll) = last_write.unwrap_or((0, 1));
                    let skip = rng.gen_range(0..ll);
                    let mut d = vec![0u8; rng.gen_range(1..=ll - skip)];
                    rng.fill(&mut d[..]);
                    Op::Write(lo + skip as u64, d)
                }
                _ => {
                    let mut d = vec![0u8; rng.gen_range(1..20_000)];
                    rng.fill(&mut d[..]);
                    last_write = Some((o, d.len()));
                    Op::Write(o, d)
                }
            }
        })
        .collect();
    // models[k] = content after k ops; sizes after each op; flushes every 7 ops.
    let mut models = vec![vec![0u8; SIZE as usize]];
    let mut flushed_ops = 0;
    let mut flushed_sizes = (0, 0);
    {
        let (img, _) = image_over(&dir);
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Write(o, d) => img.write(*o, d).unwrap(),
                Op::Zero(o, l) => img.write_zeroes(*o, *l).unwrap(),
                Op::Trim(o, l) => img.trim(*o, *l).unwrap(),
            }
            let mut m = models.last().unwrap().clone();
            apply(&mut m, op);
            models.push(m);
            if i % 7 == 6 && i < 100 {
                img.flush().unwrap();
                flushed_ops = i + 1;
                flushed_sizes = (
                    fs::metadata(dir.join(LOG_FILE)).unwrap().len(),
                    fs::metadata(dir.join(DATA_FILE)).unwrap().len(),
                );
            }
        }
        assert_eq!(content(&img), *models.last().unwrap());
        // Dropped without flush: the files hold every op, the last ~20 unflushed.
    }
    let log_full = fs::metadata(dir.join(LOG_FILE)).unwrap().len();
    let data_full = fs::metadata(dir.join(DATA_FILE)).unwrap().len();
    // Some writes took dead space: the data file is smaller than every write appended.
    let appended = ops.iter().fold(4096u64, |end, op| match op {
        Op::Write(_, d) => end.next_multiple_of(4096) + d.len() as u64,
        _ => end,
    });
    assert!(
        data_full < appended,
        "{data_full} >= {appended}: no write reused dead space"
    );
    let mut cuts: Vec<(u64, u64)> = Vec::new();
    // Every record boundary past the last flush, with the data file whole or cut short.
    let mut b = flushed_sizes.0;
    while b <= log_full {
        cuts.push((b, data_full));
        cuts.push((b, rng.gen_range(flushed_sizes.1..=data_full)));
        b += 48;
    }
    // Random bytes in both files.
    for _ in 0..60 {
        cuts.push((
            rng.gen_range(flushed_sizes.0..=log_full),
            rng.gen_range(flushed_sizes.1..=data_full),
        ));
    }
    for (n, (log_len, data_len)) in cuts.into_iter().enumerate() {
        let d = tmp.path().join(format!("cut{n}"));
        copy_cut(&dir, &d, log_len, data_len);
        let (img, replayed) = image_over(&d);
        let replayed = replayed as usize;
        assert!(
            replayed >= flushed_ops,
            "cut {log_len}/{data_len}: lost flushed ops ({replayed} < {flushed_ops})"
        );
        assert_eq!(
            content(&img),
            models[replayed],
            "cut {log_len}/{data_len}: not a prefix"
        );
        // The recovered layer takes new writes and they survive another reopen.
        img.write(0, b"after recovery").unwrap();
        img.flush().unwrap();
        drop(img);
        let (img, _) = image_over(&d);
        let mut head = [0u8; 14];
        img.read(0, &mut head).unwrap();
        assert_eq!(&head, b"after recovery");
    }
}

#[test]
fn mismatched_files_and_sizes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    UpperLayer::create(&a, SIZE).unwrap();
    UpperLayer::create(&b, SIZE).unwrap();
    assert!(UpperLayer::open(&a, SIZE * 2).is_err());
    fs::copy(b.join(DATA_FILE), a.join(DATA_FILE)).unwrap();
    let err = UpperLayer::open(&a, SIZE).unwrap_err();
    assert!(err.to_string().contains("different upper layers"), "{err}");
}
