//! The two file systems the loader mounts when nothing is mounted where
//! they belong: bpffs for the pins ([`crate::pins`]) and tracefs for the
//! tracing programs ([`crate::refused`]).

use std::{ffi::CStr, ffi::CString, io, os::unix::ffi::OsStrExt, path::Path};

use anyhow::{Context, Result};

/// The statfs magic of the file system `path` is on.
pub fn magic(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).context("path with a NUL byte")?;
    // SAFETY: zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// Mounts a file system of type `fstype` (no device, no options) at `at`.
pub fn mount(fstype: &CStr, at: &Path) -> Result<()> {
    let target = CString::new(at.as_os_str().as_bytes()).context("path with a NUL byte")?;
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting {} at {}", fstype.to_string_lossy(), at.display()));
    }
    Ok(())
}
