//! `sockmap-gc decode` end to end, the binary itself: arbitrary arguments and arbitrary bytes
//! on standard input (not UTF-8, not hex, wrong lengths) end in exit 0 or 2 with a message,
//! never a panic; every valid key decodes to what the library says.
//!
//! Each case runs the binary, so the case count is modest; `PROPTEST_CASES=2000 cargo test
//! --test decode_fuzz` runs more. Failing cases are kept beside this file, in
//! `tests/decode_fuzz.proptest-regressions`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use proptest::prelude::*;
use sockmap_gc::key::{RawKey, SockKey, KEY_LEN};

const BIN: &str = env!("CARGO_BIN_EXE_sockmap-gc");

fn decode(args: &[String], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("decode")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sockmap-gc");
    if let Some(mut input) = child.stdin.take() {
        // The binary may exit before reading (arguments given): a broken pipe is fine.
        let _ = input.write_all(stdin);
    }
    child.wait_with_output().expect("sockmap-gc finishes")
}

fn check(out: &Output) -> Result<(), TestCaseError> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    prop_assert!(!stderr.contains("panicked"), "panic: {}", stderr);
    match out.status.code() {
        Some(0) => prop_assert!(!out.stdout.is_empty(), "exit 0 and nothing said"),
        Some(2) => prop_assert!(!stderr.trim().is_empty(), "exit 2 and no message"),
        other => prop_assert!(false, "exit {:?}: {}", other, stderr),
    }
    Ok(())
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-fA-F]{1,4}",
        "0x[0-9a-f]{2}",
        "[0-9a-fA-F]{86,90}",
        // Arguments cannot hold NUL bytes (execve).
        "[^\\x00]{0,12}",
        "--?[a-z]{1,8}",
        Just("--output".to_string()),
        Just("json".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_arguments_exit_0_or_2_never_panic(args in proptest::collection::vec(word(), 0..60)) {
        check(&decode(&args, b""))?;
    }

    #[test]
    fn any_bytes_on_stdin_exit_0_or_2_never_panic(input in proptest::collection::vec(any::<u8>(), 0..400)) {
        check(&decode(&[], &input))?;
    }

    #[test]
    fn hexish_stdin_exit_0_or_2_never_panic(input in "[0-9a-fA-Fx \n\t]{0,400}") {
        check(&decode(&[], input.as_bytes()))?;
    }

    /// Valid keys in a row, as bpftool prints them: each decodes to the library's reading.
    #[test]
    fn valid_keys_decode_as_the_library_reads_them(
        keys in proptest::collection::vec(any::<[u8; KEY_LEN]>(), 1..4),
        json in any::<bool>(),
    ) {
        let raws: Vec<RawKey> = keys.into_iter().map(RawKey).collect();
        let text: String = raws.iter().map(|r| r.to_bpftool_hex() + "\n").collect();
        let args: Vec<String> = if json { vec!["--output".into(), "json".into()] } else { vec![] };
        let out = decode(&args, text.as_bytes());
        check(&out)?;
        let all_valid = raws.iter().all(|r| SockKey::decode(r).is_ok());
        prop_assert_eq!(out.status.code() == Some(0), all_valid);
        if all_valid && json {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            let got = v.as_array().expect("array");
            prop_assert_eq!(got.len(), raws.len());
            for (entry, raw) in got.iter().zip(&raws) {
                let key = SockKey::decode(raw).expect("valid");
                let (hex, local, remote) = (raw.to_hex(), key.local.to_string(), key.remote.to_string());
                prop_assert_eq!(entry["key"].as_str(), Some(hex.as_str()));
                prop_assert_eq!(entry["local"].as_str(), Some(local.as_str()));
                prop_assert_eq!(entry["remote"].as_str(), Some(remote.as_str()));
            }
        }
    }
}
