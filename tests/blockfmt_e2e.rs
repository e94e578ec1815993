//! The blockfmt issue's round trips on a real ext4 filesystem holding real files: import →
//! export is byte-identical; so is a stack of three layers from successive modifications, a
//! commit of writes through the upper layer, and a squash; commits are deterministic. The
//! imported size beside `zstd -3` is printed, not asserted: it depends on what the host's
//! `/usr/share` holds, so the figure lives in `benches/chunk-size.sh`.

use std::path::Path;

use lsm_e2e::*;

fn write_file(p: &Path, seed: u8, len: usize) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect();
    std::fs::write(p, data).expect("write");
}

#[test]
fn ext4_with_usr_share_round_trips_through_layers_upper_and_commit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let staged = stage_usr_share(&t.join("tree"), 150);
    // Whatever the host has, the tree also holds generated files (some compressible, some
    // not), so every machine exercises the same paths.
    std::fs::create_dir_all(t.join("tree/generated")).expect("mkdir");
    for i in 0..16u8 {
        write_file(&t.join(format!("tree/generated/{i}.bin")), i, 1 << 20);
    }
    eprintln!("staged {staged} MiB of /usr/share + 16 MiB generated");
    let v1 = t.join("v1.raw");
    mkfs_ext4(&v1, 256, &t.join("tree"));
    let img = t.join("img.json");

    // Layer 1: the whole filesystem.
    let desc: serde_json::Value = serde_json::from_str(&ok(lsmctl(["import", "-q"])
        .arg(&v1)
        .arg("-o")
        .arg(t.join("l1.blob"))))
    .expect("json");
    assert_eq!(desc["mediaType"], "application/vnd.lsm.layer.v1");
    ok(lsmctl(["create"])
        .arg(&img)
        .arg("--layer")
        .arg(t.join("l1.blob")));
    ok(lsmctl(["export", "-q"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("out1.raw")));
    assert_eq!(
        sha256_file(&v1),
        sha256_file(&t.join("out1.raw")),
        "import → export"
    );

    // Compression yardstick (printed only; see the module doc).
    let blob1 = std::fs::metadata(t.join("l1.blob")).expect("stat").len();
    let yard = zstd3_of_nonzero_blocks(&v1);
    eprintln!(
        "imported {blob1} bytes; zstd -3 of non-zero blocks {yard} bytes; ratio {:.3}",
        blob1 as f64 / yard as f64
    );

    // Layers 2 and 3: successive modifications made by debugfs, imported as diffs.
    let extra = t.join("extra.bin");
    write_file(&extra, 1, 3 << 20);
    let v2 = t.join("v2.raw");
    std::fs::copy(&v1, &v2).expect("copy");
    debugfs(
        &v2,
        &format!(
            "mkdir /added\nwrite {} /added/one.bin\nrm /doc/base-files/copyright\n",
            extra.display()
        ),
    );
    ok(lsmctl(["import", "-q"])
        .arg(&v2)
        .arg("-o")
        .arg(t.join("l2.blob"))
        .arg("--base")
        .arg(&img)
        .arg("--add-to")
        .arg(&img));
    let v3 = t.join("v3.raw");
    std::fs::copy(&v2, &v3).expect("copy");
    write_file(&extra, 2, 5 << 20);
    debugfs(
        &v3,
        &format!(
            "write {} /added/two.bin\nrm /added/one.bin\nmkdir /added/sub\n",
            extra.display()
        ),
    );
    ok(lsmctl(["import", "-q"])
        .arg(&v3)
        .arg("-o")
        .arg(t.join("l3.blob"))
        .arg("--base")
        .arg(&img)
        .arg("--add-to")
        .arg(&img));
    ok(lsmctl(["export", "-q"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("out3.raw")));
    assert_eq!(
        sha256_file(&v3),
        sha256_file(&t.join("out3.raw")),
        "three-layer stack → export"
    );
    let l3 = std::fs::metadata(t.join("l3.blob")).expect("stat").len();
    assert!(
        l3 < blob1 / 5,
        "a diff layer holds only the changes ({l3} bytes)"
    );

    // Writes through the upper layer, then commit.
    let v4 = t.join("v4.raw");
    std::fs::copy(&v3, &v4).expect("copy");
    write_file(&extra, 3, 2 << 20);
    debugfs(
        &v4,
        &format!("write {} /added/sub/three.bin\n", extra.display()),
    );
    ok(lsmctl(["write", "-q"]).arg(&img).arg("--from").arg(&v4));
    ok(lsmctl(["export", "-q"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("out4.raw")));
    assert_eq!(
        sha256_file(&v4),
        sha256_file(&t.join("out4.raw")),
        "upper layer → export"
    );
    let c: serde_json::Value = serde_json::from_str(&ok(lsmctl(["commit"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("c4.blob"))))
    .expect("json");
    assert!(c["digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
    ok(lsmctl(["export", "-q"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("out4c.raw")));
    assert_eq!(
        sha256_file(&v4),
        sha256_file(&t.join("out4c.raw")),
        "after commit"
    );
    ok(lsmctl(["verify"]).arg(&img));

    // Squash the four layers into one; export again; squashing twice gives the same digest.
    let img2 = t.join("img2.json");
    std::fs::copy(&img, &img2).expect("copy config");
    let s1: serde_json::Value = serde_json::from_str(&ok(lsmctl(["commit", "--squash"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("sq.blob"))))
    .expect("json");
    let s2: serde_json::Value = serde_json::from_str(&ok(lsmctl(["commit", "--squash"])
        .arg(&img2)
        .arg("-o")
        .arg(t.join("sq2.blob"))))
    .expect("json");
    assert_eq!(s1["digest"], s2["digest"], "commit is deterministic");
    ok(lsmctl(["export", "-q"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("out5.raw")));
    assert_eq!(
        sha256_file(&v4),
        sha256_file(&t.join("out5.raw")),
        "after squash"
    );
    // The squashed bottom layer of the final content equals a fresh import of it.
    let fresh: serde_json::Value = serde_json::from_str(&ok(lsmctl(["import", "-q"])
        .arg(&v4)
        .arg("-o")
        .arg(t.join("fresh.blob"))))
    .expect("json");
    assert_eq!(
        fresh["digest"], s1["digest"],
        "squash = import of the same content"
    );
}
