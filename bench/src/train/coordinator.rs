//! The coordinator's side of a run: workers as threads, or as processes it starts, tells when to
//! go, and reads back.

use super::*;

pub(super) fn run_threads(
    args: &TrainArgs,
    data: &Data,
    probe: &mut Probe<'_>,
) -> Result<(Vec<WorkerResult>, f64)> {
    let batches = args.train.div_ceil(args.batch) * args.epochs;
    let bar = crate::progress::bar(batches as u64, "training batches");
    let start = Instant::now();
    let say = |line: String| bar.println(line);
    let results = std::thread::scope(|s| -> Result<Vec<WorkerResult>> {
        let handles: Vec<_> = (0..args.workers)
            .map(|w| {
                let bar = &bar;
                s.spawn(move || -> Result<WorkerResult> {
                    let mut tables = WorkerTables::connect(args)?;
                    worker(args, &args.batches_of(w), data, &mut tables, bar)?;
                    tables.finish()
                })
            })
            .collect();
        evaluate_while(args, start, probe, &say, &mut || {
            Ok(handles.iter().all(|h| h.is_finished()))
        })?;
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })?;
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((results, secs))
}

/// Starts one `train-worker` process per worker, waits until each has generated its data and
/// connected, starts them together, evaluates while they run and reads their results.
pub(super) fn run_processes(
    args: &TrainArgs,
    probe: &mut Probe<'_>,
) -> Result<(Vec<WorkerResult>, f64)> {
    let exe = std::env::current_exe().context("finding this program to start workers")?;
    let settings = serde_json::to_string(args)?;
    let mut children = Vec::with_capacity(args.workers);
    for w in 0..args.workers {
        let mut words: Vec<String> = args
            .spawn_prefix
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(|word| word.replace("{i}", &w.to_string()))
            .collect();
        words.push(exe.display().to_string());
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..])
            .args(["train-worker", "--index", &w.to_string(), "--settings"])
            .arg(&settings)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting worker {w}: {}", words.join(" ")))?;
        children.push(WorkerProcess::new(w, child));
    }
    for c in &mut children {
        let line = c.read_line()?;
        anyhow::ensure!(
            line.trim() == "ready",
            "worker {} said {line:?} instead of \"ready\"",
            c.index
        );
    }
    let start = Instant::now();
    for c in &mut children {
        c.send("go")?;
    }
    let say = |line: String| eprintln!("{line}");
    evaluate_while(args, start, probe, &say, &mut || {
        let mut all = true;
        for c in &mut children {
            all &= c.exited()?;
        }
        Ok(all)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let results = children
        .iter_mut()
        .map(|c| {
            let line = c.read_line()?;
            serde_json::from_str(&line)
                .with_context(|| format!("worker {}'s result {line:?}", c.index))
        })
        .collect::<Result<_>>()?;
    Ok((results, secs))
}

/// A worker process and the pipes to it.
pub(super) struct WorkerProcess {
    index: usize,
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    status: Option<std::process::ExitStatus>,
}

impl WorkerProcess {
    fn new(index: usize, mut child: Child) -> Self {
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Self {
            index,
            child,
            stdout,
            status: None,
        }
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .with_context(|| format!("reading from worker {}", self.index))?;
        if line.is_empty() {
            let status = self.child.wait()?;
            anyhow::bail!("worker {} ended ({status}) without answering", self.index);
        }
        Ok(line)
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").with_context(|| format!("starting worker {}", self.index))
    }

    /// Whether it has exited; an error if it failed.
    fn exited(&mut self) -> Result<bool> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        match self.status {
            Some(s) if !s.success() => anyhow::bail!("worker {} failed: {s}", self.index),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
