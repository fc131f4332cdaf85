//! Hostile and corrupt weight files: safetensors whose header or offsets claim gigabytes,
//! garbage bytes, and `pytorch_model.bin` files built here from the tiny-gpt2-zh checkpoint with
//! a crafted `data.pkl` (globals outside the tensor-rebuild set, a tensor shape claiming 40 GB).
//! Each must be a typed error, and nothing large may be allocated on the way: this test binary
//! counts the largest single allocation it makes.

mod common;
use common::*;
use kvgpt::Model;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, recording the largest single request of this process.
struct Recording;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

/// Nothing in these tests legitimately allocates more than this at once (tiny-gpt2's largest
/// tensor, wte, is 6.4 MB).
const LARGEST_ALLOWED: usize = 64 << 20;

fn assert_no_large_allocation() {
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < LARGEST_ALLOWED, "an allocation of {largest} bytes was made");
}

fn load_dir(dir: &Path) -> kvgpt::Result<Model> {
    Model::load(dir.to_str().unwrap(), &Default::default())
}

fn load_err(dir: &Path) -> kvgpt::Error {
    match load_dir(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

/// A tiny-gpt2 directory whose model.safetensors is `bytes`.
fn safetensors_dir(tag: &str, bytes: &[u8]) -> TempDir {
    let dir = TempDir::new(tag);
    copy_fixture_files("tiny-gpt2", &["config.json", "tokenizer.json"], dir.path());
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    dir
}

/// A safetensors file: 8-byte little-endian header length, the header, then `data`.
fn safetensors(header_len: u64, header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = header_len.to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn safetensors_claiming_gigabytes_or_corrupt_are_invalid_files() {
    let big_tensor = r#"{"wte.weight":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("header-8gib", safetensors(8 << 30, "{}", &[]), "header too large"),
        ("header-u64-max", safetensors(u64::MAX, "{}", &[]), "header too large"),
        // Under safetensors' own 100 MB header limit, but longer than the file.
        ("header-50mib", safetensors(50 << 20, "{}", &[0; 64]), "invalid header length"),
        ("offsets-40gb", safetensors(big_tensor.len() as u64, big_tensor, &[0; 16]), "incomplete metadata"),
        ("header-not-json", safetensors(5, "nojso", &[]), "invalid JSON in header"),
        ("empty", vec![], "header too small"),
        ("garbage", (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(), "not a valid safetensors file"),
    ];
    for (tag, bytes, expected) in cases {
        let dir = safetensors_dir(tag, &bytes);
        let e = load_err(dir.path());
        assert_eq!(e.code(), "KVGPT_INVALID_FILE", "{tag}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("model.safetensors") && msg.contains(expected), "{tag}: {msg}");
    }
    assert_no_large_allocation();
}

/// A tiny-gpt2-zh directory whose pytorch_model.bin holds the fixture's entries with its
/// `data.pkl` replaced by `edit(original)`, written as torch.save does (a stored zip).
fn bin_dir(tag: &str, edit: impl Fn(&[u8]) -> Vec<u8>) -> TempDir {
    let dir = TempDir::new(tag);
    copy_fixture_files("tiny-gpt2-zh", &["config.json", "vocab.txt"], dir.path());
    let source = std::fs::File::open(fixture("tiny-gpt2-zh").join("pytorch_model.bin")).unwrap();
    let mut input = zip::ZipArchive::new(source).unwrap();
    let mut output = zip::ZipWriter::new(std::fs::File::create(dir.path().join("pytorch_model.bin")).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..input.len() {
        let mut entry = input.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            bytes = edit(&bytes);
        }
        output.start_file(name, stored).unwrap();
        output.write_all(&bytes).unwrap();
    }
    output.finish().unwrap();
    dir
}

/// `data` with the first occurrence of `from` replaced by `to`.
fn replace_once(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = data.windows(from.len()).position(|w| w == from).expect("pattern in data.pkl");
    [&data[..at], to, &data[at + from.len()..]].concat()
}

#[test]
fn a_rewritten_bin_with_the_original_pickle_loads() {
    // The control for the cases below: the zip rewriting itself keeps a valid checkpoint.
    let dir = bin_dir("bin-intact", |pkl| pkl.to_vec());
    let model = load_dir(dir.path()).unwrap();
    let (prompt, expected) = reference_prompt("tiny-gpt2-zh", 0);
    assert_eq!(run(&model, &prompt, &greedy(expected.len(), true)).tokens, expected);
    assert_no_large_allocation();
}

#[test]
fn a_bin_whose_pickle_names_a_callable_outside_the_allow_list_is_refused() {
    let marker = std::env::temp_dir().join(format!("kvgpt-pwned-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let command = format!("touch {}", marker.display());
    let binunicode = |s: &str| [&[b'X'][..], &(s.len() as u32).to_le_bytes(), s.as_bytes()].concat();
    let short = |s: &str| [&[0x8c, s.len() as u8][..], s.as_bytes(), &[0x94]].concat();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // The classic: GLOBAL os.system, called with a shell command (protocol 2, as torch.save).
        ("os-system", [&b"\x80\x02cos\nsystem\n("[..], &binunicode(&command), b"tR."].concat(), "os.system"),
        ("posix-system", [&b"cposix\nsystem\n("[..], &binunicode(&command), b"tR."].concat(), "posix.system"),
        // Protocol 4: the name built on the stack for STACK_GLOBAL.
        (
            "stack-global-exec",
            [&b"\x80\x04"[..], &short("builtins"), &short("exec"), b"\x93(", &binunicode("import os"), b"tR."].concat(),
            "builtins.exec",
        ),
        ("subprocess", [&b"csubprocess\nPopen\n("[..], &binunicode(&command), b"tR."].concat(), "subprocess.Popen"),
        ("torch-load", b"ctorch\nload\n)R.".to_vec(), "torch.load"),
    ];
    for (tag, pickle, global) in cases {
        let dir = bin_dir(tag, |_| pickle.clone());
        let e = load_err(dir.path());
        assert_eq!(e.code(), "KVGPT_INVALID_FILE", "{tag}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("names {global},")) && msg.contains("refusing to load it"), "{tag}: {msg}");
    }
    // Hidden inside the real state dict: the first storage class swapped for os.system.
    let dir = bin_dir("embedded", |pkl| replace_once(pkl, b"ctorch\nFloatStorage\n", b"cos\nsystem\n"));
    let e = load_err(dir.path());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE");
    assert!(e.to_string().contains("names os.system,"), "{e}");
    assert!(!marker.exists(), "nothing was executed");
    assert_no_large_allocation();
}

#[test]
fn a_bin_whose_tensor_claims_more_than_its_storage_is_refused_before_allocating() {
    // wte.weight is (825, 32) with strides (32, 1); make it (100000, 100000), strides
    // (100000, 1): 40 GB of f32 from a 105,600-byte storage entry.
    let dir = bin_dir("huge-shape", |pkl| {
        let pkl = replace_once(pkl, b"M\x39\x03K\x20\x86", b"J\xa0\x86\x01\x00J\xa0\x86\x01\x00\x86");
        replace_once(&pkl, b"K\x20K\x01\x86", b"J\xa0\x86\x01\x00K\x01\x86")
    });
    let e = load_err(dir.path());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE", "{e}");
    assert!(e.to_string().contains("needs 40000000000 bytes but its storage holds 105600"), "{e}");
    // A truncated pickle (a string running past the end) is refused by the scan.
    let dir = bin_dir("truncated-pickle", |pkl| pkl[..pkl.len() / 2].to_vec());
    let e = load_err(dir.path());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE", "{e}");
    assert!(e.to_string().contains("data.pkl"), "{e}");
    // Not a zip at all.
    let dir = TempDir::new("bin-garbage");
    copy_fixture_files("tiny-gpt2-zh", &["config.json", "vocab.txt"], dir.path());
    std::fs::write(dir.path().join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = load_err(dir.path());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE", "{e}");
    assert!(e.to_string().contains("not a readable PyTorch checkpoint"), "{e}");
    assert_no_large_allocation();
}

#[test]
fn a_sharded_index_naming_a_missing_shard_is_file_not_found() {
    let dir = TempDir::new("missing-shard");
    copy_fixture_files("tiny-gpt2", &["config.json", "tokenizer.json"], dir.path());
    let index = r#"{"metadata": {}, "weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
    let e = load_err(dir.path());
    assert_eq!(e.code(), "KVGPT_FILE_NOT_FOUND");
    let msg = e.to_string();
    assert!(msg.starts_with("weights shard not found") && msg.contains("model-00001-of-00002.safetensors"), "{msg}");
    // An index without a weight_map is malformed.
    std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"metadata": {}}"#).unwrap();
    assert_eq!(load_err(dir.path()).code(), "KVGPT_INVALID_FILE");
}
