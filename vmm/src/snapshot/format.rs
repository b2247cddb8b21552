//! The snapshot state file (`state.bin`): a fixed header, then a JSON payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "GROVESNP"
//!      8     4  format version (little endian), independent of the crate version
//!     12     4  reserved, zero
//!     16     8  payload length in bytes (little endian)
//!     24    32  BLAKE3 hash of the payload
//!     56     n  payload: the JSON encoding of the snapshot state
//! ```
//!
//! Reading checks, in order, the file size limit, the magic, the version, that the payload
//! length matches the file exactly (truncation, trailing data), the checksum, then parses.
//! See docs/snapshot-format.md for the compatibility policy.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const MAGIC: &[u8; 8] = b"GROVESNP";
/// The state format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 56;
/// Largest state file accepted: real states are a few hundred KiB.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// Errors reading or writing a state file. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read snapshot state {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write snapshot state {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path} is {size} bytes, more than the {MAX_STATE_BYTES}-byte limit")]
    TooLarge { path: String, size: u64 },
    #[error("{path} is not a Grove snapshot state file (bad magic)")]
    BadMagic { path: String },
    #[error(
        "snapshot state {path} has format version {found}; this grove-vmm reads version {FORMAT_VERSION}"
    )]
    Version { path: String, found: u32 },
    #[error("snapshot state {path} is truncated or has trailing data ({actual} payload bytes, header says {expected})")]
    Length {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot state {path} is corrupt: checksum mismatch")]
    Checksum { path: String },
    #[error("snapshot state {path} is corrupt: {reason}")]
    Parse { path: String, reason: String },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// Encodes `state` as a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = serde_json::to_vec(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a complete state file held in memory.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &str) -> Result<T, FormatError> {
    let path = path.to_string();
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic { path });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            path,
            found: version,
        });
    }
    // Reserved for flags of later versions: a version-1 reader accepts none.
    if u32_at(12) != 0 {
        return Err(FormatError::Parse {
            path,
            reason: "unknown header flags".into(),
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let expected = u64::from_le_bytes(len);
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != expected {
        return Err(FormatError::Length {
            path,
            expected,
            actual: payload.len() as u64,
        });
    }
    if blake3::hash(payload).as_bytes() != &bytes[24..56] {
        return Err(FormatError::Checksum { path });
    }
    serde_json::from_slice(payload).map_err(|e| FormatError::Parse {
        path,
        reason: e.to_string(),
    })
}

/// Writes `state` to `path` and fsyncs it.
pub fn write_file<T: Serialize>(path: &Path, state: &T) -> Result<(), FormatError> {
    let display = path.display().to_string();
    let bytes = encode(state)?;
    let err = |source| FormatError::Write {
        path: display.clone(),
        source,
    };
    let mut f = File::create(path).map_err(err)?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Reads and checks the state file at `path`, never reading more than the size limit.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let display = path.display().to_string();
    let err = |source| FormatError::Read {
        path: display.clone(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    if size > MAX_STATE_BYTES {
        return Err(FormatError::TooLarge {
            path: display,
            size,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // `take` bounds the read even if the file grows meanwhile.
    f.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(FormatError::TooLarge {
            path: display,
            size: bytes.len() as u64,
        });
    }
    decode(&bytes, &display)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(&S {
            a: 7,
            b: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn round_trips() {
        let s: S = decode(&sample(), "x").unwrap();
        assert_eq!(
            s,
            S {
                a: 7,
                b: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let good = sample();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                // Every change must be refused, whatever field it hits.
                assert!(
                    decode::<S>(&bad, "x").is_err(),
                    "byte {i} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn names_the_problem() {
        let good = sample();
        assert!(matches!(
            decode::<S>(b"nope", "x"),
            Err(FormatError::BadMagic { .. })
        ));
        let mut v = good.clone();
        v[8] = 2;
        let e = decode::<S>(&v, "/snap/state.bin").unwrap_err();
        assert!(matches!(e, FormatError::Version { found: 2, .. }));
        assert!(e.to_string().contains("/snap/state.bin"), "{e}");
        assert!(matches!(
            decode::<S>(&good[..good.len() - 1], "x"),
            Err(FormatError::Length { .. })
        ));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            decode::<S>(&longer, "x"),
            Err(FormatError::Length { .. })
        ));
        let mut v = good.clone();
        let last = v.len() - 1;
        v[last] ^= 0x20;
        assert!(matches!(
            decode::<S>(&v, "x"),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn well_formed_but_wrong_json_is_a_parse_error() {
        let bytes = encode(&serde_json::json!({"a": 1, "c": 2})).unwrap();
        assert!(matches!(
            decode::<S>(&bytes, "x"),
            Err(FormatError::Parse { .. })
        ));
    }

    #[test]
    fn files_over_the_limit_are_not_read() {
        let dir = std::env::temp_dir().join(format!("grove-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.bin");
        let f = File::create(&p).unwrap();
        f.set_len(MAX_STATE_BYTES + 1).unwrap();
        assert!(matches!(
            read_file::<S>(&p),
            Err(FormatError::TooLarge { .. })
        ));
        write_file(&p, &S { a: 1, b: vec![] }).unwrap();
        assert_eq!(read_file::<S>(&p).unwrap(), S { a: 1, b: vec![] });
        std::fs::remove_dir_all(dir).unwrap();
    }
}
