//! BPF_PROG_TEST_RUN: one run of a loaded program on a crafted frame, for
//! the fixtures (tests/prog_test_run.rs) and the benchmark's lookup costs.

use std::time::Duration;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{Program, ProgramError, TestRun, TestRunOptions, TestRunResult},
};

/// What one run returned.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's return value (XDP or TC verdict).
    pub verdict: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
    /// The kernel's measure of the run.
    pub duration: Duration,
}

/// Runs program `prog` of `ebpf` (of type `P`: `Xdp` or
/// `SchedClassifier`, loaded) once on `frame`.
pub fn test_run<P>(ebpf: &mut Ebpf, prog: &str, frame: &[u8]) -> Result<Run>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
    for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let p: &mut P = nat_loader::dataplane::program(ebpf, prog)?;
    // Room for programs that grow the frame (ICMP errors quote it).
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        verdict: r.return_value,
        out,
        duration: r.duration,
    })
}
