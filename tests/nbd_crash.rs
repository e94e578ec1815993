//! Crash safety through NBD: `lsmd` is killed with SIGKILL in the middle of a write workload
//! that flushes every few writes; after a restart every write acknowledged before the last
//! acknowledged FLUSH reads back intact (checked with nbdcopy and with fio's verify pass), and
//! blocks written after it hold either their flushed content or one of the later writes —
//! never anything else.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::time::Duration;

use lsm_e2e::nbd::*;
use lsm_e2e::*;

const BLOCK: usize = 4096;
/// The workload's region: the first 64 MiB (over the lower layers' data and holes).
const REGION_BLOCKS: u64 = 16384;
/// Writes in flight at once, then their replies, then (every other batch) a FLUSH.
const BATCH: usize = 8;

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A block's content for write generation `gen`: a header naming both, then bytes derived
/// from them, so a read identifies exactly which write it sees.
fn block_content(block: u64, gen: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&gen.to_le_bytes());
    let mut r = xorshift(block.wrapping_mul(0x9e37_79b9) ^ gen.wrapping_mul(0x85eb_ca6b) | 1);
    while b.len() < BLOCK {
        b.extend_from_slice(&r().to_le_bytes());
    }
    b
}

/// The generation a block holds, if it holds a well-formed write of this test.
fn parse_block(block: u64, b: &[u8]) -> Option<u64> {
    let gen = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    (b.get(..8)? == block.to_le_bytes() && b == block_content(block, gen)).then_some(gen)
}

/// One write of the log: `blocks` blocks from `start`, all with generation `gen`.
#[derive(Clone, Copy)]
struct Write {
    start: u64,
    blocks: u64,
    gen: u64,
}

/// Writes batches until the connection dies. Returns the log of every write *sent* and how
/// many of them the last acknowledged FLUSH covers.
fn workload(sock: &std::path::Path, seed: u64, first_gen: u64) -> (Vec<Write>, usize) {
    let mut log = Vec::new();
    let mut durable = 0;
    let Ok(mut c) = RawClient::connect(sock) else {
        return (log, durable);
    };
    let mut rnd = xorshift(seed);
    let mut gen = first_gen;
    for batch in 0.. {
        // Non-overlapping writes in a batch: the server may run them in any order.
        let mut used = HashSet::new();
        let mut sent = 0;
        for _ in 0..BATCH {
            let blocks = 1 + rnd() % 16;
            let start = rnd() % (REGION_BLOCKS - blocks);
            if (start..start + blocks).any(|b| used.contains(&b)) {
                continue;
            }
            used.extend(start..start + blocks);
            gen += 1;
            let mut data = Vec::with_capacity(blocks as usize * BLOCK);
            for b in start..start + blocks {
                data.extend_from_slice(&block_content(b, gen));
            }
            log.push(Write { start, blocks, gen });
            if c.send(
                CMD_WRITE,
                gen,
                start * BLOCK as u64,
                data.len() as u32,
                &data,
            )
            .is_err()
            {
                return (log, durable);
            }
            sent += 1;
        }
        for _ in 0..sent {
            match c.reply() {
                Ok((0, _)) => {}
                Ok((e, _)) => panic!("write failed with error {e}"),
                Err(_) => return (log, durable),
            }
        }
        if batch % 2 == 1 {
            let covered = log.len();
            match c.flush() {
                Ok(0) => durable = covered,
                Ok(e) => panic!("flush failed with error {e}"),
                Err(_) => return (log, durable),
            }
        }
    }
    unreachable!()
}

#[test]
fn kill9_during_flushing_writes_keeps_every_flushed_write() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = layered_image(t, 256, 3);
    let lower = std::fs::read(&raw).expect("read reference");
    let sock = t.join("lsmd.sock");
    let config = [OsStr::new("--config"), img.as_os_str()];

    // fio writes (and flushes) a second region first; it must survive every crash below.
    let fio_args = [
        "--name=flushed",
        "--rw=randwrite",
        "--bs=4k",
        "--offset=128M",
        "--size=64M",
        "--io_size=16M",
        "--iodepth=8",
        "--fsync=16",
        "--end_fsync=1",
        "--verify=crc32c",
        "--randrepeat=1",
    ];
    let d = Lsmd::start(&sock, &config);
    let (pass, out) = fio(&d.uri(), &fio_args);
    assert!(pass, "fio write phase failed:\n{out}");

    // What each block of the region holds now: None = the lower layers' content.
    let mut state: HashMap<u64, u64> = HashMap::new();
    let mut d = Some(d);
    let mut next_gen = 0;
    let mut flushed_total = 0;
    let mut rnd = xorshift(0x5eed);
    for round in 0..4u64 {
        let daemon = d.take().unwrap_or_else(|| Lsmd::start(&sock, &config));
        let s = sock.clone();
        let first = next_gen;
        let writer = std::thread::spawn(move || workload(&s, 1 + round, first));
        std::thread::sleep(Duration::from_millis(300 + rnd() % 900));
        daemon.kill9();
        let (log, durable) = writer.join().expect("workload thread");
        assert!(!log.is_empty(), "round {round}: nothing was written");
        next_gen = log.last().map_or(next_gen, |w| w.gen);
        flushed_total += durable;
        eprintln!(
            "round {round}: {} writes sent, {durable} covered by the last acknowledged flush",
            log.len()
        );

        // Expected: the state after the flushed prefix; allowed besides: any later write.
        let mut expect = state.clone();
        for w in &log[..durable] {
            for b in w.start..w.start + w.blocks {
                expect.insert(b, w.gen);
            }
        }
        let mut later: HashMap<u64, Vec<u64>> = HashMap::new();
        for w in &log[durable..] {
            for b in w.start..w.start + w.blocks {
                later.entry(b).or_default().push(w.gen);
            }
        }

        let daemon = Lsmd::start(&sock, &config);
        let copy = t.join("after-crash.raw");
        ok(std::process::Command::new("nbdcopy")
            .arg(daemon.uri())
            .arg(&copy));
        let disk = std::fs::read(&copy).expect("read copy");
        for b in 0..REGION_BLOCKS {
            let at = b as usize * BLOCK;
            let got = &disk[at..at + BLOCK];
            let seen = parse_block(b, got);
            let ok_flushed = match expect.get(&b) {
                Some(&g) => seen == Some(g),
                None => got == &lower[at..at + BLOCK],
            };
            let ok_later = seen.is_some_and(|g| later.get(&b).is_some_and(|v| v.contains(&g)));
            assert!(
                ok_flushed || ok_later,
                "round {round}: block {b} holds {seen:?}, expected {:?} or one of {:?} \
                 ({} writes sent, {durable} flushed)",
                expect.get(&b),
                later.get(&b),
                log.len()
            );
            match seen {
                Some(g) => state.insert(b, g),
                None => state.remove(&b),
            };
        }
        d = Some(daemon);
    }
    assert!(flushed_total > 0, "no flush was acknowledged in any round");

    // fio's own verify pass over the region it wrote before the crashes.
    let daemon = d.take().expect("daemon");
    let mut verify = fio_args.to_vec();
    verify.push("--verify_only");
    let (pass, out) = fio(&daemon.uri(), &verify);
    assert!(
        pass,
        "fio verify after crashes failed:\n{out}\nlsmd: {}",
        daemon.log()
    );
    assert!(daemon.terminate().success());
    ok(lsmctl(["verify"]).arg(&img));
}
