//! The emulator's temporary directory: its CA file and, without a shared server, its private
//! cluster.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::EmulatorError;

/// The emulator's temporary directory (CA file, private cluster), removed on drop.
pub(super) struct WorkDir {
    pub(super) path: PathBuf,
}

impl WorkDir {
    /// A new directory under `DSQL_EMULATOR_WORK_DIR`, else `/dev/shm` where it is a
    /// writable directory with at least 2 GiB free (a memory file system: a PostgreSQL there
    /// starts and copies databases several times faster than on disk; containers often give
    /// it only 64 MiB), else the system's temporary directory.
    pub(super) fn create() -> Result<WorkDir, EmulatorError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "dsql-emulator-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            fastrand::u32(..)
        );
        let configured = std::env::var_os("DSQL_EMULATOR_WORK_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        let bases = match configured {
            Some(base) => vec![base],
            None if roomy_shm() => vec![PathBuf::from("/dev/shm"), std::env::temp_dir()],
            None => vec![std::env::temp_dir()],
        };
        let mut last = None;
        for base in &bases {
            let path = base.join(&name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(WorkDir { path }),
                Err(e) => last = Some((path, e)),
            }
        }
        let (path, e) = last.expect("at least one base directory");
        Err(EmulatorError::caused(
            format!("cannot create {}", path.display()),
            e,
        ))
    }
}

/// Whether `/dev/shm` has room for a few servers (2 GiB free).
fn roomy_shm() -> bool {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::statvfs("/dev/shm")
            .is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) >= 2 << 30)
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
