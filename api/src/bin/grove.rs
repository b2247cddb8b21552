//! `grove`: the command line for groved.
//!
//! A thin layer over [`grove_api::client::Client`]: parse the command with clap, send one
//! request (or follow one stream), print the answer. Output is for people by default (tables,
//! an indented tree for `ls`, one line per action) and for scripts with `--json`, which prints
//! the API's JSON exactly as the daemon sent it, only re-indented (same keys, same order, same
//! numbers). Progress (`image build`) and errors go to stderr, so stdout stays parseable.
//!
//! Errors are one line, `grove: error: <message>`, and the exit code says whose fault it was:
//! 1 when the daemon answered with an error (4xx/5xx), 2 for usage errors and when the daemon
//! could not be reached or understood. A closed stdout (`grove ls | head -1`) ends quietly.

use std::future::Future;
use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine as _;
use clap::{Parser, Subcommand};
use grove_api::client::{Client, ClientError, Route};
use grove_api::model::{
    BranchTimings, CreateEnvironment, CreateImage, EnvState, Environment, Event, ExecRequest,
    Image, Readiness,
};

const AFTER_HELP: &str = "\
The daemon is reached on --socket, else on groved's default socket ($GROVE_SOCKET, else
/run/grove/groved.sock for root, else $XDG_RUNTIME_DIR/grove/groved.sock); or over TCP with
--url, the token from --token or $GROVE_TOKEN (prefer the variable: arguments are visible to
other users).

Exit codes:
  0  success
  1  groved answered with an error (4xx/5xx); the message is its own
  2  usage error, groved could not be reached, or its answer was not understood";

#[derive(Debug, Parser)]
#[command(
    name = "grove",
    version,
    about = "Drive groved: images, and environments (microVMs) that branch like git branches",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The daemon's Unix socket.
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "url")]
    socket: Option<PathBuf>,
    /// The daemon's TCP address, http://host:port.
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// Bearer token for --url (default: $GROVE_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN", requires = "url")]
    token: Option<String>,
    /// Print the API's JSON (pretty) instead of tables; events as one JSON object a line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List images.
    Images,
    /// Register, build or remove an image.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List environments as a tree (children under the environment they branched from).
    Ls,
    /// Boot a new environment from an image.
    Create {
        name: String,
        #[arg(long)]
        image: String,
        /// Number of vCPUs (default: the daemon's).
        #[arg(long)]
        vcpus: Option<u8>,
        /// Memory in MiB (default: the daemon's).
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// The image has no grove agent: do not wait for it (no identity, no exec).
        #[arg(long)]
        no_agent: bool,
        /// Publish this guest TCP port on a port of the daemon's host (repeatable).
        #[arg(long, value_name = "PORT")]
        publish: Vec<u16>,
        /// Do not let the guest open connections out of its network namespace.
        #[arg(long)]
        no_outbound: bool,
    },
    /// Branch a new environment from a running one: memory and disk, in milliseconds.
    Branch {
        name: String,
        #[arg(long, value_name = "PARENT")]
        from: String,
        /// The guest has no grove agent: do not make the clone unique (no reseed, no
        /// hostname, no hooks).
        #[arg(long)]
        no_agent: bool,
        /// Publish this guest TCP port on a port of the daemon's host (repeatable).
        #[arg(long, value_name = "PORT")]
        publish: Vec<u16>,
        /// Let the guest open connections out of its network namespace (a branch cannot by
        /// default).
        #[arg(long)]
        allow_outbound: bool,
    },
    /// Show one environment.
    Show { name: String },
    /// Stop and remove an environment.
    Rm {
        name: String,
        /// Even while environments branched from it depend on it.
        #[arg(long)]
        force: bool,
    },
    /// Pause an environment's vCPUs.
    Pause { name: String },
    /// Resume a paused environment.
    Resume { name: String },
    /// Take a snapshot of an environment (memory and disk).
    Snapshot { name: String },
    /// Re-clone an environment from its parent's current state.
    Sync { name: String },
    /// Print an environment's console output (raw bytes).
    Console {
        name: String,
        /// Keep printing what the guest writes, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Type on an environment's console: TEXT and a newline, or all of standard input.
    Type {
        name: String,
        /// Words to type, joined by spaces (default: read standard input to its end).
        text: Vec<String>,
        /// Do not add a newline after TEXT.
        #[arg(long, short = 'n')]
        no_newline: bool,
    },
    /// Run a command in an environment's guest (through its agent); its output goes to
    /// stdout and stderr and its exit status becomes grove's (128+N for signal N, 124 when it
    /// timed out).
    Exec {
        name: String,
        /// Set an environment variable for the command (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long, value_name = "DIR")]
        cwd: Option<String>,
        /// Kill the command after this many seconds (default: the daemon's, 60).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Send standard input to the command (read to its end first).
        #[arg(long, short = 'i')]
        stdin: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        argv: Vec<String>,
    },
    /// Read or write a file in an environment's guest.
    #[command(subcommand)]
    File(FileCommand),
    /// Print state changes as they happen, one line each.
    Events,
    /// Check that the daemon answers.
    Health,
    /// Print the daemon's Prometheus metrics.
    Metrics,
}

#[derive(Debug, Subcommand)]
enum FileCommand {
    /// Print a guest file to standard output.
    Get { name: String, path: String },
    /// Write standard input to a guest file (at most 512 KiB).
    Put {
        name: String,
        path: String,
        /// The file's mode, in octal (default 644).
        #[arg(long, value_name = "OCTAL")]
        mode: Option<String>,
    },
}

/// `grove exec`'s outcome when the command did not succeed: grove exits with this status
/// without a message of its own.
#[derive(Debug)]
struct GuestStatus(u8);

impl std::fmt::Display for GuestStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the command exited with status {}", self.0)
    }
}

impl std::error::Error for GuestStatus {}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Register a kernel and root filesystem already on the daemon's host.
    Add {
        name: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    /// Build the default image set (minutes the first time, cached afterwards).
    Build { name: String },
    /// Remove an image.
    Rm { name: String },
}

fn main() -> ExitCode {
    // Usage errors: clap prints them with the usage line and exits with 2.
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime");
    let result = runtime.and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<GuestStatus>().is_some() => {
            ExitCode::from(e.downcast_ref::<GuestStatus>().map_or(1, |s| s.0))
        }
        Err(e) => {
            let message = format!("{e:#}").replace(['\n', '\r'], " ");
            let _ = writeln!(io::stderr(), "grove: error: {message}");
            let api = e
                .downcast_ref::<ClientError>()
                .is_some_and(ClientError::is_api);
            ExitCode::from(if api { 1 } else { 2 })
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    match &cli.url {
        Some(url) => {
            let token = cli
                .token
                .clone()
                .or_else(|| std::env::var("GROVE_TOKEN").ok().filter(|t| !t.is_empty()));
            Ok(Client::tcp(url, token.as_deref())?)
        }
        None => Ok(Client::unix(
            cli.socket
                .clone()
                .unwrap_or_else(grove_api::paths::default_socket),
        )),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = client(&cli)?;
    let json = cli.json;
    // With --json every JSON route is sent through `Client::request` and printed as it came.
    let raw = |route| raw(&client, route);
    match cli.command {
        Command::Images if json => raw(Route::ListImages).await,
        Command::Images => out(&images_table(&client.list_images().await?)),
        Command::Image(ImageCommand::Add {
            name,
            kernel,
            rootfs,
            initrd,
        }) => {
            // The daemon resolves paths from its own directory: send them absolute.
            let req = CreateImage {
                name,
                kernel: Some(std::path::absolute(&kernel)?),
                rootfs: Some(std::path::absolute(&rootfs)?),
                initrd: initrd.map(std::path::absolute).transpose()?,
                build: None,
            };
            if json {
                return raw(Route::CreateImage(&req)).await;
            }
            let image = client.create_image(&req).await?;
            out(&format!("registered image {}\n", image.name))
        }
        Command::Image(ImageCommand::Build { name }) => {
            let req = CreateImage {
                name,
                kernel: None,
                rootfs: None,
                initrd: None,
                build: Some("default".to_string()),
            };
            let label = format!("building image {}", req.name);
            let body = with_progress(&label, client.request(Route::CreateImage(&req))).await?;
            if json {
                return print_json(&body);
            }
            let image: Image = decode(&body, Route::CreateImage(&req))?;
            out(&format!(
                "built image {}\n  kernel  {}\n  rootfs  {}\n",
                image.name,
                image.kernel.display(),
                image.rootfs.display()
            ))
        }
        Command::Image(ImageCommand::Rm { name }) => {
            client.delete_image(&name).await?;
            quiet_unless_human(json, format!("removed image {name}\n"))
        }
        Command::Ls if json => raw(Route::ListEnvironments).await,
        Command::Ls => out(&environments_tree(
            &client.list_environments().await?,
            now(),
        )),
        Command::Create {
            name,
            image,
            vcpus,
            memory,
            no_agent,
            publish,
            no_outbound,
        } => {
            let req = CreateEnvironment {
                name,
                image: Some(image),
                from: None,
                vcpus,
                memory_mib: memory,
                agent: no_agent.then_some(false),
                publish,
                allow_outbound: no_outbound.then_some(false),
                snapshot_mode: None,
            };
            if json {
                return raw(Route::CreateEnvironment(&req)).await;
            }
            let created = client.create_environment(&req).await?;
            let env = &created.environment;
            let text = format!("created {}: {}\n", env.name, summary(env));
            out(&(text + &readiness(created.ready.as_ref()) + &port_lines(env)))
        }
        Command::Branch {
            name,
            from,
            no_agent,
            publish,
            allow_outbound,
        } => {
            let req = CreateEnvironment {
                name,
                image: None,
                from: Some(from),
                vcpus: None,
                memory_mib: None,
                agent: no_agent.then_some(false),
                publish,
                allow_outbound: allow_outbound.then_some(true),
                snapshot_mode: None,
            };
            if json {
                return raw(Route::CreateEnvironment(&req)).await;
            }
            let created = client.create_environment(&req).await?;
            let env = &created.environment;
            let parent = req.from.as_deref().unwrap_or_default();
            let mut text = format!("branched {} from {parent}: {}\n", env.name, summary(env));
            text += &timings(parent, &env.name, created.branch.as_ref());
            text += &readiness(created.ready.as_ref());
            text += &port_lines(env);
            out(&text)
        }
        Command::Show { name } if json => raw(Route::GetEnvironment(&name)).await,
        Command::Show { name } => out(&details(&client.get_environment(&name).await?, now())),
        Command::Rm { name, force } => {
            client.delete_environment(&name, force).await?;
            quiet_unless_human(json, format!("removed {name}\n"))
        }
        Command::Pause { name } if json => raw(Route::Pause(&name)).await,
        Command::Pause { name } => out(&state_line(&client.pause(&name).await?)),
        Command::Resume { name } if json => raw(Route::Resume(&name)).await,
        Command::Resume { name } => out(&state_line(&client.resume(&name).await?)),
        Command::Snapshot { name } if json => raw(Route::Snapshot(&name)).await,
        Command::Snapshot { name } => {
            let snap = client.snapshot(&name).await?;
            out(&format!(
                "snapshot {} of {} ({} paused {:.1} ms)\n",
                snap.id, snap.environment, snap.environment, snap.pause_ms
            ))
        }
        Command::Sync { name } if json => raw(Route::Sync(&name)).await,
        Command::Sync { name } => {
            let synced = client.sync(&name).await?;
            let env = &synced.environment;
            let parent = env.parent.as_deref().unwrap_or("its parent");
            let mut text = format!("synced {} from {parent}: {}\n", env.name, summary(env));
            text += &timings(parent, &env.name, synced.branch.as_ref());
            text += &readiness(synced.ready.as_ref());
            out(&text)
        }
        Command::Console { name, follow } => console(&client, &name, follow).await,
        Command::Type {
            name,
            text,
            no_newline,
        } => {
            let input = if text.is_empty() {
                let mut input = Vec::new();
                io::stdin().lock().read_to_end(&mut input)?;
                input
            } else {
                let newline = if no_newline { "" } else { "\n" };
                format!("{}{newline}", text.join(" ")).into_bytes()
            };
            Ok(client.console_input(&name, &input).await?)
        }
        Command::Exec {
            name,
            env,
            cwd,
            timeout,
            stdin,
            argv,
        } => {
            let mut vars = std::collections::BTreeMap::new();
            for pair in env {
                let (k, v) = pair
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .with_context(|| format!("--env {pair:?}: expected KEY=VALUE"))?;
                vars.insert(k.to_string(), v.to_string());
            }
            let input = if stdin {
                let mut input = Vec::new();
                io::stdin().lock().read_to_end(&mut input)?;
                Some(base64::engine::general_purpose::STANDARD.encode(input))
            } else {
                None
            };
            let req = ExecRequest {
                argv,
                env: vars,
                cwd,
                stdin: input,
                timeout_ms: timeout.map(|s| s.saturating_mul(1000)),
            };
            if json {
                return raw(Route::Exec {
                    name: &name,
                    req: &req,
                })
                .await;
            }
            exec(&client, &name, &req).await
        }
        Command::File(FileCommand::Get { name, path }) => {
            let data = client.read_file(&name, &path).await?;
            let mut stdout = io::stdout().lock();
            stdout.write_all(&data)?;
            Ok(stdout.flush()?)
        }
        Command::File(FileCommand::Put { name, path, mode }) => {
            let mode = mode
                .map(|m| {
                    u32::from_str_radix(&m, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .with_context(|| format!("--mode {m:?}: expected an octal mode"))
                })
                .transpose()?;
            let mut data = Vec::new();
            io::stdin().lock().read_to_end(&mut data)?;
            client.write_file(&name, &path, &data, mode).await?;
            quiet_unless_human(
                json,
                format!("wrote {} bytes to {name}:{path}\n", data.len()),
            )
        }
        Command::Events => events(&client, json).await,
        Command::Health => {
            let body = client.health().await?;
            if json && serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok() {
                return print_json(body.as_bytes());
            }
            // `{"status": "ok"}` prints as `ok`; any other body as it came.
            let status = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("status")?.as_str().map(str::to_string));
            let text = status.unwrap_or_else(|| body.trim().to_string());
            out(&format!("{}\n", if text.is_empty() { "ok" } else { &text }))
        }
        Command::Metrics => out(&client.metrics().await?),
    }
}

/// Console output from the start: one request per chunk the daemon sends, until it has
/// nothing more; or one streamed request with `--follow`.
async fn console(client: &Client, name: &str, follow: bool) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    if follow {
        let mut stream = client.console_follow(name, 0).await?;
        while let Some(chunk) = stream.next().await {
            stdout.write_all(&chunk?)?;
            stdout.flush()?;
        }
        return Ok(());
    }
    let mut offset = 0u64;
    loop {
        let chunk = client.console(name, offset).await?;
        if chunk.is_empty() {
            break;
        }
        stdout.write_all(&chunk)?;
        offset = offset.saturating_add(u64::try_from(chunk.len())?);
    }
    Ok(stdout.flush()?)
}

async fn events(client: &Client, json: bool) -> anyhow::Result<()> {
    let mut stream = client.events().await?;
    let mut stdout = io::stdout().lock();
    loop {
        let line = if json {
            match stream.next_data().await {
                Some(data) => data?.replace('\n', " "),
                None => break,
            }
        } else {
            match stream.next().await {
                Some(event) => event_line(&event?),
                None => break,
            }
        };
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
    }
    Ok(())
}

/// Runs `request` while showing that it runs: a spinner with the elapsed seconds when stderr
/// is a terminal (erased at the end), else the label, a dot every two seconds and the time taken
/// (`building image default..... 10s`).
async fn with_progress<F: Future>(label: &str, request: F) -> F::Output {
    const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    // Progress is cosmetic: failing to write it must not fail the command.
    let mut stderr = io::stderr();
    let tty = stderr.is_terminal();
    let start = Instant::now();
    let period = if tty {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(2)
    };
    let first = if tty {
        start.into()
    } else {
        (start + period).into()
    };
    let mut ticks = tokio::time::interval_at(first, period);
    if !tty {
        let _ = write!(stderr, "{label}");
    }
    tokio::pin!(request);
    let mut frame = 0usize;
    let output = loop {
        tokio::select! {
            output = &mut request => break output,
            _ = ticks.tick() => {
                if tty {
                    let spin = FRAMES[frame % FRAMES.len()];
                    let secs = start.elapsed().as_secs();
                    let _ = write!(stderr, "\r{spin} {label} {secs}s");
                    frame = frame.wrapping_add(1);
                } else {
                    let _ = write!(stderr, ".");
                }
            }
        }
    };
    if tty {
        let _ = write!(stderr, "\r\x1b[2K");
    } else {
        let _ = writeln!(stderr, " {}s", start.elapsed().as_secs());
    }
    output
}

async fn raw(client: &Client, route: Route<'_>) -> anyhow::Result<()> {
    print_json(&client.request(route).await?)
}

fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    Ok(stdout.flush()?)
}

/// Routes that answer 204 print nothing with `--json` (there is no JSON to pass on).
fn quiet_unless_human(json: bool, text: String) -> anyhow::Result<()> {
    if json {
        Ok(())
    } else {
        out(&text)
    }
}

fn print_json(body: &[u8]) -> anyhow::Result<()> {
    out(&format!("{}\n", pretty_json(body)?))
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8], route: Route<'_>) -> anyhow::Result<T> {
    serde_json::from_slice(body).map_err(|source| {
        ClientError::Decode {
            method: route.method(),
            path: route.path(),
            source,
        }
        .into()
    })
}

/// Re-indents JSON text the way `serde_json::to_string_pretty` does, without parsing it into
/// a map: keys keep the daemon's order and numbers their exact text.
fn pretty_json(body: &[u8]) -> anyhow::Result<String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).context("groved's answer is not JSON")?;
    let text = std::str::from_utf8(body).context("groved's answer is not UTF-8")?;
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push(c);
                while let Some(c) = chars.next() {
                    out.push(c);
                    match c {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '{' | '[' => {
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                out.push(c);
                if chars.peek().is_some_and(|&n| n == '}' || n == ']') {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// `running, 2 vCPUs, 512 MiB, image default, pid 1234`
fn summary(env: &Environment) -> String {
    let mut text = format!(
        "{}, {} vCPU{}, {} MiB, image {}",
        state_name(env.state),
        env.vcpus,
        if env.vcpus == 1 { "" } else { "s" },
        env.memory_mib,
        env.image
    );
    if let Some(pid) = env.pid {
        text += &format!(", pid {pid}");
    }
    text
}

/// Runs `req` in `name`, copies its output to stdout and stderr, and turns its status into
/// grove's.
async fn exec(client: &Client, name: &str, req: &ExecRequest) -> anyhow::Result<()> {
    let result = client.exec(name, req).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let stdout = b64.decode(&result.stdout).context("stdout from groved")?;
    let stderr = b64.decode(&result.stderr).context("stderr from groved")?;
    io::stdout().lock().write_all(&stdout)?;
    io::stdout().lock().flush()?;
    let mut err = io::stderr().lock();
    err.write_all(&stderr)?;
    if result.truncated {
        writeln!(err, "grove: output beyond 4 MiB per stream was dropped")?;
    }
    let status = if result.timed_out {
        writeln!(err, "grove: the command timed out and was killed")?;
        124
    } else if let Some(signal) = result.signal {
        128 + signal.clamp(0, 127)
    } else {
        result.exit_code.unwrap_or(1)
    };
    match u8::try_from(status & 0xff).unwrap_or(1) {
        0 => Ok(()),
        code => Err(GuestStatus(code).into()),
    }
}

/// The readiness line of a created, branched or synced environment.
fn readiness(ready: Option<&Readiness>) -> String {
    match ready {
        Some(r) => {
            let split = match (r.guest_ms, r.added_ms, r.host_ms, r.guest_transport_ms) {
                (Some(guest), Some(added), Some(host), Some(transport)) => format!(
                    " (guest's own work {guest:.1} ms, added {added:.1} ms: host {host:.1} ms, \
                     guest transport {transport:.1} ms)"
                ),
                (Some(guest), Some(added), _, _) => {
                    format!(" (guest's own work {guest:.1} ms, added by Grove {added:.1} ms)")
                }
                _ => String::new(),
            };
            let mut text = format!(
                "  ready after {:.1} ms more{split}: hostname {}{}",
                r.ready_ms,
                r.hostname,
                if r.reseeded {
                    ", reseeded, clock set"
                } else {
                    ""
                }
            );
            if !r.hooks.is_empty() {
                let names: Vec<&str> = r.hooks.iter().map(|h| h.name.as_str()).collect();
                text += &format!(", hooks {}", names.join(" "));
            }
            text + "\n"
        }
        None => String::new(),
    }
}

/// `  port 8080 on 127.0.0.1:41234`, one line per published port.
fn port_lines(env: &Environment) -> String {
    env.ports
        .iter()
        .map(|p| format!("  port {} on {}\n", p.guest_port, p.host_addr))
        .collect()
}

/// `8080→127.0.0.1:41234 5432→127.0.0.1:41235`, or `-`.
fn ports_cell(env: &Environment) -> String {
    if env.ports.is_empty() {
        return "-".into();
    }
    let cells: Vec<String> = env
        .ports
        .iter()
        .map(|p| format!("{}→{}", p.guest_port, p.host_addr))
        .collect();
    cells.join(" ")
}

fn timings(parent: &str, child: &str, timings: Option<&BranchTimings>) -> String {
    match timings {
        Some(t) => format!(
            "  {parent} paused for {:.1} ms\n  {child} running after {:.1} ms (snapshot {:.1} ms, restore {:.1} ms)\n",
            t.parent_pause_ms, t.total_ms, t.snapshot_ms, t.restore_ms
        ),
        None => String::new(),
    }
}

fn state_line(env: &Environment) -> String {
    format!("{}: {}\n", env.name, state_name(env.state))
}

fn state_name(state: EnvState) -> &'static str {
    match state {
        EnvState::Starting => "starting",
        EnvState::Running => "running",
        EnvState::Paused => "paused",
        EnvState::Stopped => "stopped",
        EnvState::Failed => "failed",
    }
}

fn event_line(event: &Event) -> String {
    let mut line = format!(
        "{} {} {} {}",
        utc(event.time),
        event.kind,
        event.name,
        event.action
    );
    if let Some(state) = event.state {
        line += &format!(" {}", state_name(state));
    }
    line
}

fn images_table(images: &[Image]) -> String {
    if images.is_empty() {
        return "no images yet: grove image build default\n".to_string();
    }
    let rows = images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                utc(i.created),
                i.kernel.display().to_string(),
                i.rootfs.display().to_string(),
                i.initrd
                    .as_ref()
                    .map_or("-".to_string(), |p| p.display().to_string()),
            ]
        })
        .collect();
    table(&["NAME", "CREATED", "KERNEL", "ROOTFS", "INITRD"], rows)
}

/// The environments as a tree: each under its parent, in the daemon's order. An environment
/// whose parent is not in the list is a root; a loop in the parent edges (a daemon bug)
/// cannot loop here, as every environment is printed once.
fn environments_tree(envs: &[Environment], now: u64) -> String {
    if envs.is_empty() {
        return "no environments yet: grove create NAME --image IMAGE\n".to_string();
    }
    let index_of = |name: &str| envs.iter().position(|e| e.name == name);
    let parent_of = |e: &Environment| e.parent.as_deref().and_then(index_of);
    let mut printed = vec![false; envs.len()];
    let mut rows = Vec::with_capacity(envs.len());
    // The PORTS column only when some environment publishes a port.
    let with_ports = envs.iter().any(|e| !e.ports.is_empty());
    // Depth-first with an explicit stack of (index, prefix for its children, its own marker).
    let roots: Vec<usize> = (0..envs.len())
        .filter(|&i| parent_of(&envs[i]).is_none())
        .collect();
    let mut pending: Vec<usize> = roots.into_iter().chain(0..envs.len()).collect();
    pending.reverse();
    let mut stack: Vec<(usize, String, String)> = Vec::new();
    while let Some(root) = pending.pop() {
        if printed[root] {
            continue;
        }
        stack.push((root, String::new(), String::new()));
        while let Some((i, indent, marker)) = stack.pop() {
            if printed[i] {
                continue;
            }
            printed[i] = true;
            let env = &envs[i];
            let mut row = vec![
                format!("{indent}{marker}{}", env.name),
                state_name(env.state).to_string(),
                env.image.clone(),
                env.vcpus.to_string(),
                format!("{} MiB", env.memory_mib),
                ago(env.created, now),
            ];
            if with_ports {
                row.push(ports_cell(env));
            }
            rows.push(row);
            let children: Vec<usize> = (0..envs.len())
                .filter(|&c| !printed[c] && parent_of(&envs[c]) == Some(i))
                .collect();
            let child_indent = match marker.as_str() {
                "" => indent.clone(),
                "├─ " => format!("{indent}│  "),
                _ => format!("{indent}   "),
            };
            for (n, &c) in children.iter().enumerate().rev() {
                let last = n + 1 == children.len();
                let marker = if last { "└─ " } else { "├─ " };
                stack.push((c, child_indent.clone(), marker.to_string()));
            }
        }
    }
    let mut header = vec!["NAME", "STATE", "IMAGE", "VCPUS", "MEM", "CREATED"];
    if with_ports {
        header.push("PORTS");
    }
    table(&header, rows)
}

fn details(env: &Environment, now: u64) -> String {
    let mut lines = vec![
        ("name", env.name.clone()),
        ("state", state_name(env.state).to_string()),
    ];
    if let Some(parent) = &env.parent {
        lines.push(("parent", parent.clone()));
    }
    lines.push(("image", env.image.clone()));
    lines.push(("vcpus", env.vcpus.to_string()));
    lines.push(("memory", format!("{} MiB", env.memory_mib)));
    lines.push((
        "created",
        format!("{} ({})", utc(env.created), ago(env.created, now)),
    ));
    if let Some(snapshot) = &env.snapshot {
        lines.push(("snapshot", snapshot.clone()));
    }
    if let Some(pid) = env.pid {
        lines.push(("pid", pid.to_string()));
    }
    if let Some(reason) = &env.exit_reason {
        lines.push(("exit reason", reason.clone()));
    }
    if let Some(address) = &env.address {
        lines.push(("address", address.clone()));
    }
    if let Some(allow) = env.allow_outbound {
        let outbound = if allow { "allowed" } else { "denied" };
        lines.push(("outbound", outbound.to_string()));
    }
    for p in &env.ports {
        lines.push(("port", format!("{} on {}", p.guest_port, p.host_addr)));
    }
    lines
        .into_iter()
        .map(|(key, value)| format!("{:<12} {value}\n", format!("{key}:")))
        .collect()
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = header.iter().map(|h| h.to_string()).collect();
    let mut text = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (n, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if n + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = width.saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `42s ago`, `5m ago`, `3h ago`, `12d ago`.
fn ago(then: u64, now: u64) -> String {
    let secs = now.saturating_sub(then);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// `2024-05-06 07:08:09` (UTC) from seconds since the epoch.
fn utc(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm), in u64: no negatives
    // after the shift by 719468 days to 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_json_keeps_order_and_numbers() {
        let raw = br#"{"z":1.50,"a":[],"m":{},"s":"a,b:{\"q\"}","l":[1,{"k":null}]}"#;
        let expected = "{\n  \"z\": 1.50,\n  \"a\": [],\n  \"m\": {},\n  \"s\": \"a,b:{\\\"q\\\"}\",\n  \"l\": [\n    1,\n    {\n      \"k\": null\n    }\n  ]\n}";
        assert_eq!(pretty_json(raw).ok().as_deref(), Some(expected));
        let value: serde_json::Value =
            serde_json::from_slice(br#"{"b":[1,2],"a":{"c":"d"}}"#).expect("valid JSON");
        let serde = serde_json::to_string_pretty(&value).expect("serializes");
        assert_eq!(
            pretty_json(
                serde_json::to_string(&value)
                    .expect("serializes")
                    .as_bytes()
            )
            .ok(),
            Some(serde)
        );
        assert!(pretty_json(b"{\"a\":").is_err());
    }

    #[test]
    fn readiness_line_shows_the_guests_work_and_grove_s_share() {
        let mut ready = Readiness {
            ready_ms: 40.25,
            guest_ms: Some(30.0),
            added_ms: Some(10.25),
            guest_wait_ms: None,
            host_ms: None,
            guest_transport_ms: None,
            hostname: "feature-x".into(),
            reseeded: true,
            hooks: Vec::new(),
        };
        assert_eq!(
            readiness(Some(&ready)),
            "  ready after 40.2 ms more (guest's own work 30.0 ms, added by Grove 10.2 ms): \
             hostname feature-x, reseeded, clock set\n"
        );
        (ready.host_ms, ready.guest_transport_ms) = (Some(2.0), Some(8.25));
        assert_eq!(
            readiness(Some(&ready)),
            "  ready after 40.2 ms more (guest's own work 30.0 ms, added 10.2 ms: host 2.0 ms, \
             guest transport 8.2 ms): hostname feature-x, reseeded, clock set\n"
        );
        (ready.guest_ms, ready.added_ms) = (None, None);
        assert_eq!(
            readiness(Some(&ready)),
            "  ready after 40.2 ms more: hostname feature-x, reseeded, clock set\n"
        );
        assert_eq!(readiness(None), "");
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(ago(100, 160), "1m ago");
        assert_eq!(ago(200, 100), "0s ago");
    }
}
