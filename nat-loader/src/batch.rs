//! Batched reads and deletes of a BPF hash map (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, kernel >= 5.6), which aya 0.14 lacks: a few
//! hundred syscalls for a million entries instead of two per entry. Keys
//! and values are nat-common's `Pod` layouts, copied as the kernel lays
//! them out.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::maps::{IterableMap, MapData};
use bytemuck::Pod;

use crate::sys;

/// Entries asked for per lookup call. A hash map answers a whole bucket at
/// a time, so the chunk must hold the largest bucket (ENOSPC otherwise:
/// the chunk grows and the call is repeated). Small: the kernel does not
/// reschedule inside a call (about 0.3 µs per entry), and the NAPI thread
/// of a NIC that shares the sweeper's CPU waits for it while the NIC's
/// ring (256 frames on a veth) fills. The CPU per pass barely moves with
/// the chunk (1 M sessions, nothing to remove: 406 ms at 8,192, 417–419 ms
/// at 1,024; 131,072 no cheaper than 8,192).
const CHUNK: usize = 1024;

/// The `batch` member of `union bpf_attr`.
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

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    sys::bpf(cmd, attr).map(|_| ())
}

fn fd_of<K: aya::Pod, V>(map: &impl IterableMap<K, V>) -> u32 {
    let data: &MapData = map.map();
    data.fd().as_fd().as_raw_fd() as u32
}

/// Every entry of hash map `map`, read in batches. Entries added or removed
/// meanwhile may or may not be in it (as with a walk by key).
pub fn entries<K, V, M>(map: &M) -> io::Result<Vec<(K, V)>>
where
    K: Pod + aya::Pod,
    V: Pod,
    M: IterableMap<K, V>,
{
    entries_of(map.map().fd().as_fd())
}

/// [`entries`] of the hash map behind `fd` (keys `K`, values `V`, as the
/// map was created with): for maps opened from their pins read-only, which
/// aya does not wrap (`nat-loader conntrack`).
pub fn entries_of<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let fd = fd.as_raw_fd() as u32;
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = vec![K::zeroed(); chunk];
    let mut values: Vec<V> = vec![V::zeroed(); chunk];
    // The bucket cursor of a hash map is a u32.
    let mut cursor: u32 = 0;
    let mut first = true;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd,
            ..Default::default()
        };
        let r = bpf(sys::BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => {}
            // The end of the map (the last entries, if any, came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // A bucket larger than the chunk: grow it and ask again.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                chunk *= 2;
                keys.resize(chunk, K::zeroed());
                values.resize(chunk, V::zeroed());
                continue;
            }
            Err(e) => return Err(e),
        }
        cursor = next;
        first = false;
    }
}

/// Deletes `keys` from hash map `map` in batches; keys already gone are
/// skipped. Returns how many it deleted.
pub fn delete<K, V, M>(map: &M, keys: &[K]) -> io::Result<usize>
where
    K: Pod + aya::Pod,
    M: IterableMap<K, V>,
{
    let fd = fd_of(map);
    let mut done = 0;
    let mut deleted = 0;
    while done < keys.len() {
        let rest = &keys[done..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len().min(u32::MAX as usize) as u32,
            map_fd: fd,
            ..Default::default()
        };
        let r = bpf(sys::BPF_MAP_DELETE_BATCH, &mut attr);
        let n = attr.count as usize;
        done += n;
        deleted += n;
        match r {
            Ok(()) => {}
            // Stopped at a key that is gone (the dataplane or another
            // sweeper removed it): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Inserts or replaces `entries` in hash map `map` in batches.
pub fn update<K, V, M>(map: &M, entries: &[(K, V)]) -> io::Result<()>
where
    K: Pod + aya::Pod,
    V: Pod,
    M: IterableMap<K, V>,
{
    let fd = fd_of(map);
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd,
            ..Default::default()
        };
        bpf(sys::BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != keys.len() {
            return Err(io::Error::other(format!(
                "batch update stopped after {} of {} entries",
                attr.count,
                keys.len()
            )));
        }
    }
    Ok(())
}
