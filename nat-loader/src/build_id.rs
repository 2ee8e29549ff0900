//! The build identifier: logged at start, so an upgrade shows which build
//! adopted the dataplane.
//!
//! It is set at build time with `NAT_LOADER_BUILD_ID` (default `dev`), or
//! stamped into a built binary afterwards with [`stamp`]: the binary holds
//! one [`SLOT_LEN`]-byte slot, [`TAG`] followed by the id and NUL padding.
//! The upgrade test stamps a copy of the loader this way to get a second,
//! different build without compiling one.

use anyhow::{Result, bail};

/// The bytes that open the slot.
pub const TAG: &str = "NAT_LOADER_BUILD_ID=";
/// Length of the slot: the tag, the id, at least one NUL.
pub const SLOT_LEN: usize = 64;
/// The longest id that fits.
pub const MAX_ID_LEN: usize = SLOT_LEN - TAG.len() - 1;

#[used]
static SLOT: [u8; SLOT_LEN] = slot(match option_env!("NAT_LOADER_BUILD_ID") {
    Some(id) => id,
    None => "dev",
});

/// The slot holding `id`.
pub const fn slot(id: &str) -> [u8; SLOT_LEN] {
    let mut slot = [0u8; SLOT_LEN];
    let tag = TAG.as_bytes();
    let id = id.as_bytes();
    assert!(id.len() <= MAX_ID_LEN, "NAT_LOADER_BUILD_ID is too long");
    let mut i = 0;
    while i < tag.len() {
        slot[i] = tag[i];
        i += 1;
    }
    let mut j = 0;
    while j < id.len() {
        slot[i + j] = id[j];
        j += 1;
    }
    slot
}

/// This binary's build id.
pub fn current() -> String {
    // Volatile: the slot may be rewritten in the file after compilation,
    // so its contents must be read at run time, not folded in.
    // SAFETY: a plain read of a static array.
    let slot: [u8; SLOT_LEN] = unsafe { std::ptr::read_volatile(&SLOT) };
    id_of(&slot).to_string()
}

/// A copy of `binary` (a loader executable) with its build id replaced by
/// `id`. The slot is the one place where [`TAG`] is followed by a
/// printable id and NUL padding to the end of the slot (the tag's text may
/// occur elsewhere too, e.g. in this function's own constants).
pub fn stamp(binary: &[u8], id: &str) -> Result<Vec<u8>> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("build id {id:?}: 1 to {MAX_ID_LEN} printable ASCII characters");
    }
    let slots: Vec<usize> = binary
        .windows(SLOT_LEN)
        .enumerate()
        .filter(|(_, w)| is_slot(w))
        .map(|(at, _)| at)
        .collect();
    let at = match slots.as_slice() {
        [at] => *at,
        [] => bail!("no build-id slot ({TAG}...) in the binary"),
        _ => bail!("{} build-id slots in the binary, expected one", slots.len()),
    };
    let mut out = binary.to_vec();
    out[at..at + SLOT_LEN].copy_from_slice(&slot_bytes(id));
    Ok(out)
}

fn slot_bytes(id: &str) -> [u8; SLOT_LEN] {
    let mut s = [0u8; SLOT_LEN];
    s[..TAG.len()].copy_from_slice(TAG.as_bytes());
    s[TAG.len()..TAG.len() + id.len()].copy_from_slice(id.as_bytes());
    s
}

fn is_slot(w: &[u8]) -> bool {
    let Some(rest) = w.strip_prefix(TAG.as_bytes()) else {
        return false;
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    end > 0
        && end < rest.len()
        && rest[..end].iter().all(u8::is_ascii_graphic)
        && rest[end..].iter().all(|&b| b == 0)
}

fn id_of(slot: &[u8; SLOT_LEN]) -> &str {
    let id = &slot[TAG.len()..];
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    std::str::from_utf8(&id[..end]).unwrap_or("(not UTF-8)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_holds_the_id_after_its_tag() {
        let s = slot("abc");
        assert!(s.starts_with(TAG.as_bytes()));
        assert_eq!(&s[TAG.len()..TAG.len() + 4], b"abc\0");
        assert_eq!(id_of(&s), "abc");
        assert!(!current().is_empty());
    }

    #[test]
    fn stamp_replaces_the_one_slot_and_nothing_else() {
        // A tag elsewhere (not followed by a padded id) is not a slot.
        let mut binary = b"prefix NAT_LOADER_BUILD_ID= and then ".to_vec();
        binary.extend_from_slice(&slot("dev"));
        binary.extend_from_slice(b"suffix");
        let stamped = stamp(&binary, "upgrade-1").expect("stamp");
        assert_eq!(stamped.len(), binary.len());
        let at = binary.len() - 6 - SLOT_LEN;
        let s: [u8; SLOT_LEN] = stamped[at..at + SLOT_LEN].try_into().expect("slot");
        assert_eq!(id_of(&s), "upgrade-1");
        assert_eq!(stamped[..at], binary[..at]);
        assert_eq!(stamped[at + SLOT_LEN..], binary[at + SLOT_LEN..]);
    }

    #[test]
    fn stamp_refuses_no_slot_two_slots_and_bad_ids() {
        assert!(stamp(b"no slot here", "x").is_err());
        let two = [slot("a"), slot("b")].concat();
        assert!(stamp(&two, "x").is_err());
        let one = slot("a");
        assert!(stamp(&one, "").is_err());
        assert!(stamp(&one, "has space").is_err());
        assert!(stamp(&one, &"x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(stamp(&one, &"x".repeat(MAX_ID_LEN)).is_ok());
    }
}
