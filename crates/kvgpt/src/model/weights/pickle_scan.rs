//! Checks a PyTorch checkpoint's pickle before candle reads it: every global it names (the
//! callables and classes that unpickling would import) must be on the tensor-rebuild allow-list,
//! as torch's `weights_only` unpickler demands. candle's reader never executes anything, but a
//! pickle that names `os.system` is a hostile file, and the user should hear so, not get a
//! "tensor missing" error. The scan walks the opcodes without building objects; no crate offers
//! a pickle disassembler that reports globals (serde-pickle resolves or drops them silently).

use std::collections::HashMap;

/// What unpickling a state dict may import: torch's `weights_only` allow-list, narrowed to what
/// a tensor checkpoint uses (`torch/_weights_only_unpickler.py`, `_get_allowed_globals`).
const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.nn.parameter.Parameter",
    "torch.Tensor",
    "torch.Size",
    "torch.device",
    "torch.strided",
    "torch.float16",
    "torch.bfloat16",
    "torch.float32",
    "torch.float64",
    "torch.int64",
    "torch.int32",
    "torch.int16",
    "torch.int8",
    "torch.uint8",
    "torch.bool",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.UntypedStorage",
];

/// Why a pickle was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It names a global outside the allow-list (`module.name`).
    Global(String),
    /// It is not a well-formed pickle, or uses a construct the scan cannot vouch for.
    Malformed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Global(g) => write!(
                f,
                "the pickle names {g}, which is not one of the classes and functions that rebuild tensors \
                 (torch's weights_only allow-list); refusing to load it. Get the weights as model.safetensors \
                 from a source you trust"
            ),
            Refusal::Malformed(m) => write!(f, "not a checkpoint pickle kvgpt can vouch for: {m}"),
        }
    }
}

fn check_global(module: &str, name: &str) -> Result<(), Refusal> {
    let full = format!("{module}.{name}");
    if ALLOWED.contains(&full.as_str()) {
        Ok(())
    } else {
        Err(Refusal::Global(full))
    }
}

/// The argument that follows an opcode.
enum Arg {
    None,
    Fixed(usize),
    /// A little-endian length of this many bytes, then that many bytes.
    Counted(usize),
    /// Text up to a newline.
    Line,
}

/// Scans one pickle (protocols 0 to 5) up to its STOP opcode.
pub fn scan(data: &[u8]) -> Result<(), Refusal> {
    let mut at = 0usize;
    // What is known about the top of the stack: the strings pushed since the last opcode that
    // did anything else (STACK_GLOBAL takes its module and name from the top two items).
    let mut top: Vec<Option<String>> = Vec::new();
    let mut memo: HashMap<u64, Option<String>> = HashMap::new();
    let malformed = |m: String| Refusal::Malformed(m);
    loop {
        let Some(&op) = data.get(at) else {
            return Err(malformed("the pickle ends without a STOP opcode (truncated?)".into()));
        };
        let op_at = at;
        at += 1;
        let arg = match op {
            b'(' | b'.' | b'0' | b'1' | b'2' | b'N' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e' | b'l' | b']'
            | b'o' | b's' | b't' | b')' | b'u' | b'Q' | 0x81 | 0x85..=0x89 | 0x8f..=0x94 | 0x97 | 0x98 => Arg::None,
            b'K' | b'h' | b'q' | 0x80 | 0x82 => Arg::Fixed(1),
            b'M' | 0x83 => Arg::Fixed(2),
            b'J' | b'j' | b'r' | 0x84 => Arg::Fixed(4),
            b'G' | 0x95 => Arg::Fixed(8),
            b'U' | b'C' | 0x8c | 0x8a => Arg::Counted(1),
            b'T' | b'B' | b'X' | 0x8b => Arg::Counted(4),
            0x8d | 0x8e | 0x96 => Arg::Counted(8),
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' | b'c' | b'i' => Arg::Line,
            other => return Err(malformed(format!("unknown opcode 0x{other:02x} at byte {op_at}"))),
        };
        let arg: &[u8] = match arg {
            Arg::None => &[],
            Arg::Fixed(n) => take(data, &mut at, n as u64, op_at)?,
            Arg::Counted(width) => {
                let len = le(take(data, &mut at, width as u64, op_at)?);
                take(data, &mut at, len, op_at)?
            }
            Arg::Line => line(data, &mut at, op_at)?,
        };
        match op {
            b'.' => return Ok(()),
            // GLOBAL and INST: "module\nname\n" inline.
            b'c' | b'i' => {
                let name = line(data, &mut at, op_at)?;
                check_global(&utf8(arg)?, &utf8(name)?)?;
                top.clear();
            }
            0x93 => {
                // STACK_GLOBAL: name on top, module under it; both must be strings pushed just before.
                let name = top.pop().flatten();
                let module = top.pop().flatten();
                match (module, name) {
                    (Some(m), Some(n)) => check_global(&m, &n)?,
                    _ => {
                        return Err(malformed(format!(
                            "STACK_GLOBAL at byte {op_at} does not take its module and name from plain strings"
                        )))
                    }
                }
                top.clear();
            }
            0x82..=0x84 => return Err(malformed(format!("extension-registry opcode (EXT) at byte {op_at}"))),
            // Strings: SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, UNICODE.
            0x8c | b'X' | 0x8d | b'V' => top.push(std::str::from_utf8(arg).ok().map(str::to_string)),
            // The memo does not change the stack; remember strings put there.
            b'q' | b'r' | b'p' | 0x94 => {
                let key = match op {
                    0x94 => memo.len() as u64,
                    b'p' => utf8(arg)?.trim().parse().map_err(|_| malformed(format!("bad PUT index at byte {op_at}")))?,
                    _ => le(arg),
                };
                memo.insert(key, top.last().cloned().flatten());
            }
            b'h' | b'j' | b'g' => {
                let key = match op {
                    b'g' => utf8(arg)?.trim().parse().map_err(|_| malformed(format!("bad GET index at byte {op_at}")))?,
                    _ => le(arg),
                };
                top.push(memo.get(&key).cloned().flatten());
            }
            // FRAME only announces the length of what follows; PROTO names the version.
            0x95 | 0x80 => {}
            _ => top.clear(),
        }
    }
}

fn le(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64)
}

fn utf8(bytes: &[u8]) -> Result<String, Refusal> {
    std::str::from_utf8(bytes).map(str::to_string).map_err(|_| Refusal::Malformed("a global's name is not UTF-8".into()))
}

/// The next `n` bytes, or an error when the pickle is shorter than its opcodes claim.
fn take<'a>(data: &'a [u8], at: &mut usize, n: u64, op_at: usize) -> Result<&'a [u8], Refusal> {
    let left = (data.len() - *at) as u64;
    if n > left {
        return Err(Refusal::Malformed(format!(
            "the opcode at byte {op_at} claims {n} bytes but only {left} are left (truncated or corrupt)"
        )));
    }
    let start = *at;
    *at += n as usize;
    Ok(&data[start..*at])
}

/// Bytes up to the next newline (not included); the newline is consumed.
fn line<'a>(data: &'a [u8], at: &mut usize, op_at: usize) -> Result<&'a [u8], Refusal> {
    let rest = &data[*at..];
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| Refusal::Malformed(format!("the opcode at byte {op_at} has no newline-terminated argument")))?;
    *at += end + 1;
    Ok(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globals_on_the_allow_list_pass_and_others_are_named() {
        // Protocol 2, as torch.save writes: GLOBAL opcodes.
        assert_eq!(scan(b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01."), Ok(()));
        assert_eq!(scan(b"cos\nsystem\n(X\x02\x00\x00\x00idtR."), Err(Refusal::Global("os.system".into())));
        assert_eq!(scan(b"i__builtin__\neval\n."), Err(Refusal::Global("__builtin__.eval".into())));
    }

    #[test]
    fn stack_global_takes_its_name_from_the_strings_before_it() {
        // Protocol 4: SHORT_BINUNICODE "os", MEMOIZE, SHORT_BINUNICODE "system", MEMOIZE, STACK_GLOBAL.
        let evil = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93.";
        assert_eq!(scan(evil), Err(Refusal::Global("os.system".into())));
        // The same names fetched back from the memo.
        let memo = b"\x8c\x05torch\x94\x8c\x0cFloatStorage\x94\x930h\x00h\x01\x93\x8c\x02os\x94\x8c\x06system\x94h\x02h\x03\x93.";
        assert_eq!(scan(memo), Err(Refusal::Global("os.system".into())));
        let ok = b"\x8c\x0ctorch._utils\x94\x8c\x12_rebuild_tensor_v2\x94\x93.";
        assert_eq!(scan(ok), Ok(()));
        // Operands that are not plain strings are refused, not guessed.
        assert!(matches!(scan(b"\x8c\x02os)\x93."), Err(Refusal::Malformed(_))));
    }

    #[test]
    fn truncated_and_unknown_input_is_malformed() {
        assert!(matches!(scan(b"\x80\x02}q\x00"), Err(Refusal::Malformed(_))), "no STOP");
        // A string claiming 4 GiB in a pickle of a few bytes: refused without reading or allocating.
        assert!(matches!(scan(b"X\xff\xff\xff\xffabc."), Err(Refusal::Malformed(m)) if m.contains("4294967295")));
        assert!(matches!(scan(b"\xff."), Err(Refusal::Malformed(m)) if m.contains("0xff")));
        assert!(matches!(scan(b"\x82\x01."), Err(Refusal::Malformed(m)) if m.contains("EXT")));
    }
}
