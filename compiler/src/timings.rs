//! Per-pass wall times for whoever is making the compiler faster: with
//! `BMC_TIME_PASSES=1` in the environment, every pass run through [`timed`] prints its
//! name and time to stderr (like rustc's `-Z time-passes`). Off, it costs one cached
//! check per pass.

use std::sync::OnceLock;
use std::time::Instant;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("BMC_TIME_PASSES").is_some_and(|v| v != "0"))
}

/// Runs `f`, printing `name` and its wall time when pass timing is on.
pub fn timed<T>(name: &str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    eprintln!("time: {:>9.3} ms  {name}", t0.elapsed().as_secs_f64() * 1e3);
    out
}
