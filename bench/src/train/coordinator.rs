//! The coordinator's side of a run: workers as threads, or as processes it starts, tells when to
//! go, and reads back.

use super::*;

/// Worker `w`'s batches, after those `--resume-batches` skips.
fn remaining(args: &TrainArgs, w: usize) -> Vec<usize> {
    let all = args.batches_of(w);
    all[args.resume_of(w).min(all.len())..].to_vec()
}

pub(super) fn run_threads(
    args: &TrainArgs,
    data: &Data,
    probe: &mut Probe<'_>,
    checkpoints: &mut Checkpoints<'_>,
) -> Result<(Vec<WorkerResult>, f64)> {
    let batches: usize = (0..args.workers).map(|w| remaining(args, w).len()).sum();
    let bar = crate::progress::bar(batches as u64, "training batches");
    let start = Instant::now();
    checkpoints.started(start);
    let say = |line: String| bar.println(line);
    let gate = ThreadGate::new(args.workers);
    let results = std::thread::scope(|s| -> Result<Vec<WorkerResult>> {
        let handles: Vec<_> = (0..args.workers)
            .map(|w| {
                let (bar, gate) = (&bar, &gate);
                s.spawn(move || -> Result<WorkerResult> {
                    let mut done = 0;
                    let result = (|| {
                        let mut tables = WorkerTables::connect(args, w)?;
                        let (batches, samples) = worker(
                            args,
                            &remaining(args, w),
                            data,
                            &mut tables,
                            bar,
                            &gate.worker(w),
                        )?;
                        done = batches;
                        tables.finish(batches, samples)
                    })();
                    // Quiet from here on, whether it finished or failed.
                    gate.finished(w, done);
                    result
                })
            })
            .collect();
        evaluate_while(args, start, probe, &say, &mut || {
            if checkpoints.due() {
                let since = Instant::now();
                let stop = checkpoints.ends_after_this();
                gate.quiesce(stop, |done| checkpoints.take(done, since))?;
            }
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
    checkpoints: &mut Checkpoints<'_>,
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
    checkpoints.started(start);
    for c in &mut children {
        c.send("go")?;
    }
    let say = |line: String| eprintln!("{line}");
    evaluate_while(args, start, probe, &say, &mut || {
        if checkpoints.due() {
            checkpoint_processes(&mut children, checkpoints)?;
        }
        let mut all = true;
        for c in &mut children {
            all &= c.exited()?;
        }
        Ok(all)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let results = children
        .iter_mut()
        .map(|c| match c.result.take() {
            Some(r) => Ok(r),
            None => c.read_result(),
        })
        .collect::<Result<_>>()?;
    Ok((results, secs))
}

/// The barrier over worker processes: `pause` to each, `paused N` (or its final result) from
/// each, the checkpoint, then `resume` (or `stop`) to those that paused.
fn checkpoint_processes(
    children: &mut [WorkerProcess],
    checkpoints: &mut Checkpoints<'_>,
) -> Result<()> {
    let since = Instant::now();
    for c in children.iter_mut().filter(|c| c.result.is_none()) {
        // One that has just exited cannot take it; its result is read below.
        let _ = c.send("pause");
    }
    let mut done = vec![0; children.len()];
    let mut paused = vec![false; children.len()];
    for (i, c) in children.iter_mut().enumerate() {
        if c.result.is_none() {
            let line = c.read_line()?;
            match line.trim().strip_prefix("paused ") {
                Some(n) => {
                    done[i] = n
                        .parse()
                        .with_context(|| format!("worker {i} said {line:?}"))?;
                    paused[i] = true;
                }
                None => {
                    c.result = Some(
                        serde_json::from_str(&line)
                            .with_context(|| format!("worker {i}'s result {line:?}"))?,
                    )
                }
            }
        }
        if let Some(r) = &c.result {
            done[i] = r.batches;
        }
    }
    let stop = checkpoints.ends_after_this();
    let taken = checkpoints.take(&done, since);
    let word = if stop || taken.is_err() {
        "stop"
    } else {
        "resume"
    };
    for (c, _) in children.iter_mut().zip(&paused).filter(|(_, &p)| p) {
        c.send(word)?;
    }
    taken
}

/// A worker process and the pipes to it.
pub(super) struct WorkerProcess {
    index: usize,
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    status: Option<std::process::ExitStatus>,
    /// Its result, when read during a checkpoint barrier.
    result: Option<WorkerResult>,
}

impl WorkerProcess {
    fn new(index: usize, mut child: Child) -> Self {
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Self {
            index,
            child,
            stdout,
            status: None,
            result: None,
        }
    }

    fn read_result(&mut self) -> Result<WorkerResult> {
        let line = self.read_line()?;
        serde_json::from_str(&line)
            .with_context(|| format!("worker {}'s result {line:?}", self.index))
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
