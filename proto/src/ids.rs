//! The one rule for sandbox, container and exec ids, shared by host and
//! guest.
//!
//! An id becomes a file name on both sides (sandbox and rootfs directories,
//! the netns file on the host; bundle, cgroup and libcontainer state
//! directories in the guest), so host and guest must agree on it and it
//! must be safe as a single path component everywhere:
//!
//! - 1 to [`MAX_LEN`] bytes: huskd's own ids are 64 hex digits (and an
//!   exec id is shorter), crictl passes prefixes of them; a longer id only
//!   makes unix socket paths under a sandbox directory overflow.
//! - ASCII letters, digits, `_`, `.` and `-` only: no `/`, no NUL, nothing
//!   a shell or a mount option would read differently.
//! - The first byte is a letter or digit: that rules out `.`, `..` and
//!   hidden files, and ids that a command line would take for an option.

/// Longest id accepted.
pub const MAX_LEN: usize = 64;

/// Why a string is not an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("must start with a letter or digit")]
    BadStart,
    #[error("only letters, digits, '-', '_' and '.' are allowed")]
    BadChar,
}

/// Checks `id` against the rule of this module.
pub fn validate(id: &str) -> Result<(), IdError> {
    let b = id.as_bytes();
    let Some(first) = b.first() else {
        return Err(IdError::Empty);
    };
    if b.len() > MAX_LEN {
        return Err(IdError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadStart);
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(IdError::BadChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runtime_ids_and_prefixes() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(hex.len(), MAX_LEN);
        for ok in [
            hex.as_str(),
            &hex[..12],
            "a",
            "0",
            "A0",
            "abc-DEF_1.2",
            "a..b",
            "exec-0123456789abcdef",
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn length_bounds() {
        assert_eq!(validate(""), Err(IdError::Empty));
        assert_eq!(validate(&"a".repeat(MAX_LEN)), Ok(()));
        assert_eq!(validate(&"a".repeat(MAX_LEN + 1)), Err(IdError::TooLong));
    }

    #[test]
    fn refuses_what_is_not_a_plain_file_name() {
        for (bad, why) in [
            (".", IdError::BadStart),
            ("..", IdError::BadStart),
            (".hidden", IdError::BadStart),
            ("-rf", IdError::BadStart),
            ("_a", IdError::BadStart),
            ("../x", IdError::BadStart),
            ("a/b", IdError::BadChar),
            ("a/../b", IdError::BadChar),
            ("a b", IdError::BadChar),
            ("a\0", IdError::BadChar),
            ("a\n", IdError::BadChar),
            ("aä", IdError::BadChar),
            ("ä", IdError::BadStart),
        ] {
            assert_eq!(validate(bad), Err(why), "{bad:?}");
        }
    }
}
