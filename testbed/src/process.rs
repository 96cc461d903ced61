//! Processes owned by the test bed: spawned so they cannot outlive the test process, and
//! stopped (SIGTERM, then SIGKILL) on every exit path.
//!
//! - Every child runs under `setpriv --pdeathsig KILL`, so the kernel kills it if the process
//!   that spawned it dies, even by SIGKILL. Children are spawned from one long-lived thread
//!   because the death signal fires when the spawning *thread* exits.
//! - Every child and every bed directory is registered; [`install_signal_handler`] makes
//!   SIGINT/SIGTERM stop them all and remove the directories before exiting.
//! - [`sweep_stale`] removes directories left by a bed whose owner died (SIGKILL), after killing
//!   the processes it recorded, identified by PID and by their command line naming that dir.
//! - What a bed changes outside its directory (a real node's bridge, cgroups, sysctls, mounts
//!   and the runtime's shims) is recorded in `<dir>/host-state` and undone by
//!   [`release_host_state`] before the directory is removed, on each of those paths.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Root under which every bed makes its directory (`<pid>-<random>`).
pub fn base_dir() -> PathBuf {
    std::env::var_os("IMAGEGC_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("imagegc-testbed"))
}

#[derive(Default)]
struct Registry {
    pids: BTreeMap<u32, String>,
    dirs: Vec<PathBuf>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a directory to remove when the process is interrupted.
pub fn register_dir(dir: &Path) {
    lock().dirs.push(dir.to_path_buf());
}

/// Forgets a directory that its owner removed itself.
pub fn unregister_dir(dir: &Path) {
    lock().dirs.retain(|d| d != dir);
}

/// Installs a SIGINT/SIGTERM handler that stops every registered process and removes every
/// registered directory, then exits with 130. Safe to call more than once.
pub fn install_signal_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("testbed: interrupted, stopping test processes");
            cleanup_all();
            std::process::exit(130);
        });
    });
}

/// Stops every registered process and removes every registered directory.
pub fn cleanup_all() {
    let (pids, dirs) = {
        let mut r = lock();
        (std::mem::take(&mut r.pids), std::mem::take(&mut r.dirs))
    };
    for pid in pids.keys() {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids.keys() {
        while alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(*pid) {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
    for dir in dirs {
        release_host_state(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// What a bed changed outside its directory, one line each in `<dir>/host-state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostChange {
    /// A network bridge it created (deleted on release).
    Bridge(String),
    /// A cgroup it created under every cgroup v1 hierarchy (emptied and removed on release).
    Cgroup(String),
    /// A sysctl (`/proc/sys` path) and the value it had before (restored on release).
    Sysctl(String, String),
    /// A directory that did not exist before and that a daemon creates at a fixed path
    /// (removed on release).
    Created(String),
}

impl HostChange {
    fn to_line(&self) -> String {
        match self {
            HostChange::Bridge(name) => format!("bridge {name}"),
            HostChange::Cgroup(name) => format!("cgroup {name}"),
            HostChange::Sysctl(path, value) => format!("sysctl {path} {value}"),
            HostChange::Created(path) => format!("created {path}"),
        }
    }

    fn parse(line: &str) -> Option<HostChange> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("bridge"), Some(name), None) => Some(HostChange::Bridge(name.into())),
            (Some("cgroup"), Some(name), None) => Some(HostChange::Cgroup(name.into())),
            (Some("sysctl"), Some(path), Some(value)) => {
                Some(HostChange::Sysctl(path.into(), value.into()))
            }
            (Some("created"), Some(path), None) => Some(HostChange::Created(path.into())),
            _ => None,
        }
    }
}

/// Records `change` in `<dir>/host-state` before it is made, so that every exit path undoes it.
pub fn record_host_change(dir: &Path, change: &HostChange) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("host-state"))?;
    std::io::Write::write_all(&mut file, format!("{}\n", change.to_line()).as_bytes())?;
    Ok(())
}

/// Undoes what the bed in `dir` did outside it: kills the processes whose command line names
/// `dir` (a runtime's shims, which outlive their daemon) and every process in its cgroups,
/// unmounts whatever is mounted under `dir` (pods' volumes, root filesystems, network
/// namespaces), removes its cgroups, deletes its bridge, restores the sysctls it changed, and
/// removes the kubelet's `/var/log/containers` links into `dir`. Harmless for a bed that
/// changed nothing; safe to call twice.
pub fn release_host_state(dir: &Path) {
    let changes: Vec<HostChange> = fs::read_to_string(dir.join("host-state"))
        .unwrap_or_default()
        .lines()
        .filter_map(HostChange::parse)
        .collect();
    let mounted = mounts_under(dir);
    if changes.is_empty() && mounted.is_empty() {
        return;
    }
    kill_processes_naming(dir);
    for change in &changes {
        if let HostChange::Cgroup(name) = change {
            kill_cgroup_tree(name);
        }
    }
    // Deepest first, lazily: a busy mount is detached now and freed when released.
    for mount in mounts_under(dir).iter().rev() {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(mount)
            .stderr(Stdio::null())
            .status();
    }
    for change in changes.iter().rev() {
        match change {
            HostChange::Cgroup(name) => remove_cgroup_tree(name),
            HostChange::Bridge(name) => {
                let _ = std::process::Command::new("ip")
                    .args(["link", "delete", name])
                    .stderr(Stdio::null())
                    .status();
            }
            HostChange::Sysctl(path, value) => {
                let _ = fs::write(path, value);
            }
            HostChange::Created(path) => {
                let _ = fs::remove_dir_all(path);
            }
        }
    }
    remove_links_into(Path::new("/var/log/containers"), dir);
    let _ = fs::remove_file(dir.join("host-state"));
}

/// Mount points under `dir`, from /proc/self/mountinfo, shallowest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| m.starts_with(&prefix))
        .map(PathBuf::from)
        .collect();
    mounts.sort_by_key(|m| m.components().count());
    mounts.dedup();
    mounts
}

fn kill_processes_naming(dir: &Path) {
    let dir = dir.to_string_lossy().to_string();
    let me = std::process::id();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != me && String::from_utf8_lossy(&cmdline).contains(&dir) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The directories of cgroup `name` in every cgroup v1 hierarchy that has it.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.is_dir())
        .collect()
}

/// Every directory under `dir`, deepest first.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(subdirs_deepest_first(&entry.path()));
        }
    }
    out.push(dir.to_path_buf());
    out
}

fn kill_cgroup_tree(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut any = false;
        for root in cgroup_dirs(name) {
            for dir in subdirs_deepest_first(&root) {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    any = true;
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if !any || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn remove_cgroup_tree(name: &str) {
    for root in cgroup_dirs(name) {
        for dir in subdirs_deepest_first(&root) {
            let _ = fs::remove_dir(&dir);
        }
    }
}

fn remove_links_into(links: &Path, dir: &Path) {
    for entry in fs::read_dir(links).into_iter().flatten().flatten() {
        if fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(dir)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter is 'Z'.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(|e| eprintln!("testbed: cannot start spawner thread: {e}"))
            .ok();
        Mutex::new(tx)
    })
}

/// A running child process owned by the bed. Dropping it stops the process.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args` with stdout and stderr appended to `log`, in the bed directory
    /// `dir` (recorded in `dir/pids` for the stale sweep).
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        dir: &Path,
        log: &Path,
    ) -> Result<Proc> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, tx))
            .map_err(|_| anyhow!("testbed spawner thread is gone"))?;
        let child = rx
            .recv()
            .map_err(|_| anyhow!("testbed spawner thread is gone"))?
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id();
        lock().pids.insert(pid, name.to_string());
        let mut pids = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("pids"))?;
        std::io::Write::write_all(&mut pids, format!("{pid}\n").as_bytes())?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// CPU time (user and system) the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.child.id())
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of the process's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends SIGKILL and reaps the process (for fault-injection tests).
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        lock().pids.remove(&self.child.id());
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL; reaps the process.
    pub fn stop(&mut self, grace: Duration) {
        let pid = self.child.id();
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!("testbed: {} did not stop in {grace:?}; killing", self.name);
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        lock().pids.remove(&pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Removes bed directories whose owning process is gone, first killing the processes they
/// recorded (only if that PID's command line still names the directory, so a reused PID is
/// never touched).
pub fn sweep_stale() {
    let Ok(entries) = fs::read_dir(base_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = entry
            .file_name()
            .to_string_lossy()
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(alive) {
            continue;
        }
        let dir_str = dir.to_string_lossy().to_string();
        if let Ok(pids) = fs::read_to_string(dir.join("pids")) {
            for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&dir_str) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
        release_host_state(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// A fresh directory for one bed, removed on drop and on interruption.
pub struct BedDir {
    path: PathBuf,
    keep: bool,
}

impl BedDir {
    /// Creates `<base>/<pid>-<random>`. Set `IMAGEGC_TESTBED_KEEP=1` to keep it for debugging.
    pub fn new() -> Result<BedDir> {
        sweep_stale();
        let base = base_dir();
        fs::create_dir_all(&base)?;
        let path = base.join(format!(
            "{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        register_dir(&path);
        Ok(BedDir {
            path,
            keep: std::env::var_os("IMAGEGC_TESTBED_KEEP").is_some(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BedDir {
    fn drop(&mut self) {
        unregister_dir(&self.path);
        release_host_state(&self.path);
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; callers retry on the rare collision).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// CPU time (user and system, its threads included) process `pid` has used so far, in
/// seconds, from `/proc/<pid>/stat`; `None` if the process is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start after the last ')';
    // utime and stime are fields 14 and 15 of stat, so the 12th and 13th after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / per_second as f64)
}

/// One kB-valued field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`, …),
/// in KiB; `None` if the process is gone or has no such field.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises this process's open-file limit (soft and hard) to at least `want`, as far as it is
/// allowed to (root may raise the hard limit up to the kernel's `nr_open`); returns the soft
/// limit in force afterwards. Children started later inherit it.
pub fn raise_open_files(want: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    let soft = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib_by_exact_name() {
        let me = std::process::id();
        let rss = status_kib(me, "VmRSS").expect("VmRSS");
        let peak = status_kib(me, "VmHWM").expect("VmHWM");
        assert!(rss > 0 && peak >= rss, "rss {rss}, peak {peak}");
        // A prefix of a field's name is not that field.
        assert_eq!(status_kib(me, "VmRS"), None);
        assert_eq!(status_kib(me, "NoSuchField"), None);
    }
}
