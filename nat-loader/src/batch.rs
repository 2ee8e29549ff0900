//! Reading a whole BPF hash map in few syscalls: `BPF_MAP_LOOKUP_BATCH`
//! hands over up to `batch` entries per call, where walking with
//! `get_next_key` + `lookup` takes two syscalls per entry (a million
//! sessions: two million syscalls). Kernels or maps without batch support
//! (EINVAL, ENOTSUPP) get the per-entry walk.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's ENOTSUPP (not the libc ENOTSUP): a map type without batch
/// operations.
const ENOTSUPP: i32 = 524;

/// `bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// `bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: attr is a live, correctly laid out bpf_attr prefix of
    // size_of::<T>() bytes; the pointers in it point at buffers that
    // outlive the call and are as large as the kernel writes.
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
        Ok(())
    }
}

/// Every entry of the hash map `map` (keys `K`, values `V`, as the map was
/// created with), `batch` entries per syscall. An entry added or deleted
/// during the read may or may not be in the result; none is returned
/// twice.
pub fn read_all<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    batch: u32,
) -> io::Result<Vec<(K, V)>> {
    match read_batched(map, batch.max(1)) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(ENOTSUPP)) => {
            read_one_by_one(map)
        }
        r => r,
    }
}

fn read_batched<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    mut batch: u32,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    // The position token: a bucket index for hash maps, a key for arrays.
    let token_len = size_of::<K>().max(8);
    let mut token_in = vec![0u8; token_len];
    let mut token_out = vec![0u8; token_len];
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); batch as usize];
        let mut values = vec![V::zeroed(); batch as usize];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(keys.len());
        match r {
            Ok(()) => {}
            // The end of the map; the last entries came with it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values).take(got));
                return Ok(out);
            }
            // One bucket holds more entries than a batch: a bigger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                batch = batch.saturating_mul(2);
                continue;
            }
            Err(e) => return Err(e),
        }
        out.extend(keys.into_iter().zip(values).take(got));
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

fn read_one_by_one<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut key: Option<K> = None;
    loop {
        let mut next = K::zeroed();
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: key.as_ref().map_or(0, |k| k as *const K as u64),
            value_or_next_key: &mut next as *mut K as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        let mut value = V::zeroed();
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: &next as *const K as u64,
            value_or_next_key: &mut value as *mut V as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => out.push((next, value)),
            // Deleted between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        key = Some(next);
    }
}
