//! Raw bpf(2), for what aya 0.14 lacks (batched map operations, pins
//! opened read-only, a link's interface): one wrapper and one copy of each
//! attribute layout, shared by [`crate::batch`], [`crate::inspect`] and
//! [`crate::pins`].

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

pub const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// `file_flags` of [`BPF_OBJ_GET`]: a read-only fd.
pub const BPF_F_RDONLY: u32 = 1 << 3;

/// bpf(2) `cmd` with attribute `attr`, a `union bpf_attr` prefix of
/// `size_of::<T>()` bytes whose pointers point at buffers that outlive the
/// call. Returns what the kernel returned (an fd for the commands that
/// make one).
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live bpf_attr prefix of size_of::<T>() bytes whose
    // pointers point at buffers that outlive the call (the caller's part).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut u8,
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The `BPF_OBJ_GET` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// An fd of the BPF object pinned at `path` (`flags`: 0 or
/// [`BPF_F_RDONLY`]).
pub fn obj_get(path: &Path, flags: u32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        file_flags: flags,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
