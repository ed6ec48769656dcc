//! The allocator, and fitting it under an address-space limit.

/// mimalloc keeps freed memory for reuse instead of returning it to the kernel: checkpoint IO
/// allocates and frees tens of MiB per chunk batch and the training step many large tensors;
/// with glibc each paid fresh page faults. Loading 1.17 GB went from 0.66 s to 0.38 s
/// (benchmarks/README.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc reserves address space 1 GiB at a time by default, which under an address-space
/// limit (`ulimit -v`, common on shared clusters) leaves too little for thread stacks and data:
/// `lockstep ckpt verify` of a 256 MiB tensor failed under 1.5 GB. mimalloc reads its options
/// once, before `main`, from the environment; so under such a limit (and only then) lockstep
/// executes itself again, once, with `MIMALLOC_ARENA_RESERVE=64MiB`. If that fails it carries
/// on as it is.
pub fn fit_address_space_limit() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_ARENA_RESERVE").is_some() {
        return;
    }
    // "Max address space  SOFT  HARD  bytes": the soft limit is the one enforced.
    let limited = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Max address space"))
                .and_then(|rest| rest.split_whitespace().next())
                .map(|soft| soft != "unlimited")
        })
        .unwrap_or(false);
    if !limited {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // Started through the dynamic loader (`ld-linux… lockstep …`): executing "ourselves" would
    // run the loader without the program.
    if exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("ld-"))
    {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("MIMALLOC_ARENA_RESERVE", "64MiB")
        .exec();
    eprintln!("warning: could not restart with smaller memory reservations: {err}");
}
