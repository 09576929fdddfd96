//! A presence storm's users: held in the storm's own process, or (`--processes` > 1) in
//! `loadgen presence-users` children, each from a source address of its own, so that 100,000
//! users fit under the per-process file limit. A child opens its share at once, then is told by
//! lines on its stdin when to drop every stream (`drop`), open them again (`open`) and leave
//! (`leave`), and answers each on stdout when done.

use crate::presence::{open, token, PresenceArgs};
use anyhow::Context as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinSet;

#[derive(clap::Args, Debug, Clone)]
pub struct UsersArgs {
    /// Public addresses of the nodes; user i connects to node i mod the count.
    #[arg(long, required = true)]
    pub target: Vec<SocketAddr>,
    #[arg(long)]
    pub secret: String,
    #[arg(long)]
    pub channel: String,
    /// This process's users are u<first> .. u<first + count - 1>.
    #[arg(long)]
    pub first: u64,
    #[arg(long)]
    pub count: u64,
    /// Source address of this process's connections.
    #[arg(long, default_value = "127.0.0.1")]
    pub source: IpAddr,
}

/// Streams opened and attempts that failed, by reason.
#[derive(Default)]
pub struct Tally {
    opened: std::sync::atomic::AtomicU64,
    failed: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn failed(&self, why: String) {
        if let Ok(mut f) = self.failed.lock() {
            *f.entry(why).or_insert(0) += 1;
        }
    }

    /// One line for the log: opened so far and failures by reason.
    pub fn line(&self) -> String {
        let failed = self
            .failed
            .lock()
            .map(|f| format!("{f:?}"))
            .unwrap_or_default();
        format!(
            "opened {} failed {failed}",
            self.opened.load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

/// Opens users `first..first + tokens.len()` (200 at once); the streams are held by the set.
pub fn open_users(
    targets: &[SocketAddr],
    channel: &str,
    first: u64,
    tokens: &Arc<Vec<String>>,
    source: Option<IpAddr>,
    tally: &Arc<Tally>,
) -> JoinSet<()> {
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let mut set = JoinSet::new();
    for (k, t) in tokens.iter().enumerate() {
        let i = first + k as u64;
        let target = targets[(i % targets.len() as u64) as usize];
        let path = format!("/v1/sse?channel={channel}&token={t}");
        let gate = gate.clone();
        let tally = tally.clone();
        set.spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            let mut s = match open(target, &path, source).await {
                Ok((s, _)) => s,
                Err(e) => {
                    // The reason without the numbers in it (a port, an address).
                    let why: String = e
                        .to_string()
                        .chars()
                        .filter(|c| !c.is_ascii_digit())
                        .collect();
                    tally.failed(why);
                    return;
                }
            };
            tally
                .opened
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
    set
}

async fn close_all(set: &mut JoinSet<()>) {
    set.abort_all();
    while set.join_next().await.is_some() {}
}

/// `loadgen presence-users`.
pub async fn main(args: UsersArgs) -> anyhow::Result<()> {
    let tokens: Arc<Vec<String>> = Arc::new(
        (args.first..args.first + args.count)
            .map(|i| token(&args.secret, &format!("u{i}")))
            .collect::<Result<_, _>>()?,
    );
    let tally = Arc::new(Tally::default());
    // Streams opened again leave from the next /24 (127.0.1.k -> 127.0.2.k): on the first
    // address the closed ones hold their ports in TIME_WAIT, and the kernel's search for a
    // free port to bind among thousands of those let only ~30 opens a second through per
    // node (the clients' cost: 100,000 browsers do not share one address).
    let again = match args.source {
        IpAddr::V4(v) => {
            let [a, b, c, d] = v.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c.wrapping_add(1), d))
        }
        other => other,
    };
    let open_all = |source: IpAddr| {
        open_users(
            &args.target,
            &args.channel,
            args.first,
            &tokens,
            Some(source),
            &tally,
        )
    };
    let mut set = open_all(args.source);
    let mut out = tokio::io::stdout();
    out.write_all(b"opening\n").await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // A parent that goes away closes stdin: the users leave.
    while let Some(line) = lines.next_line().await? {
        let answer: &[u8] = match line.trim() {
            "drop" => {
                eprintln!("presence-users from u{}: {}", args.first, tally.line());
                close_all(&mut set).await;
                b"dropped\n"
            }
            "open" => {
                set = open_all(again);
                b"opening\n"
            }
            "leave" => break,
            other => anyhow::bail!("unknown command {other:?}"),
        };
        out.write_all(answer).await?;
        out.flush().await?;
    }
    eprintln!("presence-users from u{}: {}", args.first, tally.line());
    close_all(&mut set).await;
    out.write_all(b"left\n").await?;
    out.flush().await?;
    Ok(())
}

/// The storm's users, wherever they are held.
pub enum Users {
    Here(JoinSet<()>, Arc<Tally>),
    Children(Vec<(Child, ChildStdin, Lines<BufReader<ChildStdout>>)>),
}

impl Users {
    /// Opens every user: here, or in `--processes` children (child k from 127.0.1.(k + 1)).
    pub async fn open(args: &PresenceArgs, tokens: &Arc<Vec<String>>) -> anyhow::Result<Users> {
        if args.processes <= 1 {
            let tally = Arc::new(Tally::default());
            let set = open_users(&args.target, &args.channel, 0, tokens, None, &tally);
            return Ok(Users::Here(set, tally));
        }
        let exe = std::env::current_exe().context("own path")?;
        let per = args.users.div_ceil(args.processes);
        let mut children = Vec::new();
        for k in 0..args.processes {
            let first = k * per;
            let count = per.min(args.users.saturating_sub(first));
            if count == 0 {
                break;
            }
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("presence-users")
                .arg("--secret")
                .arg(&args.secret)
                .arg("--channel")
                .arg(&args.channel)
                .arg("--first")
                .arg(first.to_string())
                .arg("--count")
                .arg(count.to_string())
                .arg("--source")
                .arg(IpAddr::V4(Ipv4Addr::new(127, 0, 1, (k + 1) as u8)).to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            for t in &args.target {
                cmd.arg("--target").arg(t.to_string());
            }
            let mut child = cmd.spawn().context("spawn presence-users")?;
            let stdin = child.stdin.take().context("child stdin")?;
            let stdout = child.stdout.take().context("child stdout")?;
            children.push((child, stdin, BufReader::new(stdout).lines()));
        }
        let mut users = Users::Children(children);
        users.answers("opening").await?;
        Ok(users)
    }

    /// Waits for every child's `want` line.
    async fn answers(&mut self, want: &str) -> anyhow::Result<()> {
        if let Users::Children(children) = self {
            for (_, _, lines) in children.iter_mut() {
                let line = lines.next_line().await?.context("a child ended")?;
                anyhow::ensure!(line == want, "a child said {line:?}, not {want:?}");
            }
        }
        Ok(())
    }

    async fn tell(&mut self, what: &str) -> anyhow::Result<()> {
        if let Users::Children(children) = self {
            for (_, stdin, _) in children.iter_mut() {
                stdin.write_all(format!("{what}\n").as_bytes()).await?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    /// Every stream drops (and stays away until [`Users::reopen`]).
    pub async fn drop_all(&mut self) -> anyhow::Result<()> {
        match self {
            Users::Here(set, tally) => {
                eprintln!("presence users: {}", tally.line());
                close_all(set).await
            }
            Users::Children(_) => {
                self.tell("drop").await?;
                self.answers("dropped").await?;
            }
        }
        Ok(())
    }

    /// Every user opens its stream again.
    pub async fn reopen(
        &mut self,
        args: &PresenceArgs,
        tokens: &Arc<Vec<String>>,
    ) -> anyhow::Result<()> {
        match self {
            Users::Here(set, tally) => {
                *set = open_users(&args.target, &args.channel, 0, tokens, None, tally)
            }
            Users::Children(_) => {
                self.tell("open").await?;
                self.answers("opening").await?;
            }
        }
        Ok(())
    }

    /// Every user leaves (the children end).
    pub async fn leave(mut self) -> anyhow::Result<()> {
        match &mut self {
            Users::Here(set, tally) => {
                eprintln!("presence users: {}", tally.line());
                close_all(set).await
            }
            Users::Children(_) => {
                self.tell("leave").await?;
                self.answers("left").await?;
                if let Users::Children(children) = &mut self {
                    for (child, _, _) in children.iter_mut() {
                        let _ = child.wait().await;
                    }
                }
            }
        }
        Ok(())
    }
}
