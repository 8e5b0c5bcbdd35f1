//! `gateway-sim`: start the simulated target fleet, play scenarios against the plugin, or load it.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use gateway_sim::{
    bench::{bench, format_bench, BenchCredential, BenchMode, BenchOptions},
    directory::{start_directory, Directory, DirectoryOptions},
    driver::{all_passed, format_table, play_with, DirectoryHandle, PlayOptions, SimEnv},
    scenario::{Account, Behavior, Scenario, TargetSpec},
    targets::{start_fleet, DirectoryManifest, Fleet, FleetManifest},
};
use tracing_subscriber::EnvFilter;

/// A fleet of faulty RDP targets and a driver that plays a gateway against rdp-preflight.
#[derive(Parser)]
#[command(name = "gateway-sim", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax); logs go to stderr.
    #[arg(long, global = true, env = "GATEWAY_SIM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the scenario's targets and run until Ctrl-C.
    Targets {
        /// Scenario file (TOML).
        #[arg(long)]
        scenario: PathBuf,
        /// Where to write the trust bundle PEM (sim CA + fixture CA) for the plugin.
        #[arg(long, default_value = "gateway-sim-ca.pem")]
        ca_out: PathBuf,
        /// Where to write the fleet manifest (addresses + CA) for `run --targets-from-fleet`.
        #[arg(long, default_value = "gateway-sim-fleet.json")]
        manifest_out: PathBuf,
        /// Where to write the simulated directory's CA PEM (when the scenario has accounts).
        #[arg(long, default_value = "gateway-sim-directory-ca.pem")]
        directory_ca_out: PathBuf,
        /// Do not start the simulated directory even if the scenario has accounts.
        #[arg(long)]
        no_directory: bool,
    },
    /// Play every row of a scenario against the plugin; exit 1 on any mismatch.
    Run {
        /// Plugin gRPC endpoint, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        plugin: String,
        /// Scenario file (TOML).
        #[arg(long)]
        scenario: PathBuf,
        /// One JSON object per row instead of the table.
        #[arg(long)]
        json: bool,
        /// Use the fleet a `gateway-sim targets` process is running (found through its
        /// manifest) instead of starting one.
        #[arg(long)]
        targets_from_fleet: bool,
        /// Manifest written by `gateway-sim targets`.
        #[arg(long, default_value = "gateway-sim-fleet.json")]
        fleet_manifest: PathBuf,
        /// Write the trust bundle of the fleet started here.
        #[arg(long)]
        ca_out: Option<PathBuf>,
        /// Start the simulated directory here too (the plugin must already point at it, so this
        /// is mostly useful with fixed ports); without it, account rows are skipped.
        #[arg(long, conflicts_with = "targets_from_fleet")]
        directory: bool,
        /// gRPC deadline per Check, milliseconds.
        #[arg(long, default_value_t = 30_000)]
        deadline_ms: u64,
        /// Targets played at the same time.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// A second plugin endpoint, configured without a directory, for `nla_only` rows.
        #[arg(long)]
        nla_only_plugin: Option<String>,
        /// A plugin endpoint configured with `[kerberos]` against the simulated KDC, for
        /// `kerberos` rows (skipped without it).
        #[arg(long)]
        kerberos_plugin: Option<String>,
    },
    /// Closed-loop load against the plugin with checks of the healthy target(s) (`--nla`: of the
    /// nla_healthy target(s)).
    Bench {
        /// Plugin gRPC endpoint.
        #[arg(long)]
        plugin: String,
        /// Concurrent workers.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Start the scenario's healthy targets (default: one healthy target, or with --nla one
        /// nla_healthy target knowing the account `bench`). With --fleet-manifest, only read for
        /// --credential's account.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Check the nla_healthy targets, offering SSL + HYBRID (the plugin runs its NLA stage);
        /// the baseline adds one TSRequest NEGOTIATE / CHALLENGE exchange.
        #[arg(long)]
        nla: bool,
        /// With --nla: send this account's credential (an [[account]] of --scenario, or `bench`
        /// with the default target) for full NLA logons; the baseline logs on too. Bench a plugin
        /// without a directory, so that the target judges the credential.
        #[arg(long, requires = "nla")]
        credential: Option<String>,
        /// Use the healthy targets of a running `gateway-sim targets` instead.
        #[arg(long)]
        fleet_manifest: Option<PathBuf>,
        /// Also perform the same handshakes directly, without the plugin, and compare.
        #[arg(long)]
        baseline: bool,
        /// The plugin's pid, to report its peak RSS (VmHWM).
        #[arg(long)]
        plugin_pid: Option<u32>,
        /// gRPC deadline per Check, milliseconds.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Start a scenario's fleet (default: the shipped sweep scenario) and sweep it with the
    /// plugin's scheduler in-process, never with a credential; print every target's state, the
    /// flapping targets and the certificate forecast.
    Sweep {
        /// Scenario file (default: the shipped sweep scenario).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Seconds per slot.
        #[arg(long, default_value_t = 1)]
        interval: u64,
        /// Slots to sweep.
        #[arg(long, default_value_t = 8)]
        slots: u64,
        /// A target changing state more than this many times is flapping.
        #[arg(long, default_value_t = 3)]
        flap_changes: u32,
    },
    /// Start the default scenario's fleet, the simulated directory and the plugin (in-process,
    /// embedded defaults plus trust in the sim's CAs), and play every row: one per cause the sim
    /// can produce.
    Demo {
        /// Scenario file (default: the shipped default scenario).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// One JSON object per row instead of the table.
        #[arg(long)]
        json: bool,
        /// Rows of different targets played at the same time.
        #[arg(long, default_value_t = 8)]
        jobs: usize,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gateway-sim: {e}");
            ExitCode::from(2)
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(command: Command) -> Result<ExitCode, BoxError> {
    match command {
        Command::Demo { scenario, json, jobs } => {
            let scenario = match scenario {
                Some(p) => Scenario::load(&p)?,
                None => Scenario::parse(gateway_sim::demo::DEFAULT_SCENARIO)?,
            };
            let started = std::time::Instant::now();
            let results = gateway_sim::demo::run_demo(&scenario, jobs.max(1)).await?;
            if json {
                for r in &results {
                    emit(&format!("{}\n", serde_json::to_string(r)?))?;
                }
            } else {
                emit(&format_table(&results))?;
                emit(&format!("demo finished in {:.1} s\n", started.elapsed().as_secs_f64()))?;
            }
            Ok(if all_passed(&results) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Sweep {
            scenario,
            interval,
            slots,
            flap_changes,
        } => {
            let scenario = match scenario {
                Some(p) => Scenario::load(&p)?,
                None => Scenario::parse(gateway_sim::demo::SWEEP_SCENARIO)?,
            };
            let d = gateway_sim::demo::run_sweep(&scenario, interval.max(1), slots.max(1), flap_changes).await?;
            emit(&gateway_sim::demo::format_sweep(&d))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Targets {
            scenario,
            ca_out,
            manifest_out,
            directory_ca_out,
            no_directory,
        } => {
            let scenario = Scenario::load(&scenario)?;
            let fleet = start_fleet(&scenario.targets).await?;
            for t in fleet.targets() {
                emit(&format!("{} {} {}\n", t.name, t.behavior, t.addr))?;
            }
            write_file(&ca_out, fleet.ca_pem())?;
            let mut manifest = fleet.manifest();
            let directory = if scenario.accounts.is_empty() || no_directory {
                None
            } else {
                let directory = start_scenario_directory(&scenario).await?;
                emit(&format!("directory ldaps {}\n", directory.ldaps_url()))?;
                if let Some(url) = directory.ldap_url() {
                    emit(&format!("directory ldap {url}\n"))?;
                }
                write_file(&directory_ca_out, directory.ca_pem())?;
                manifest.directory = Some(DirectoryManifest {
                    ldaps_url: directory.ldaps_url(),
                    ldap_url: directory.ldap_url(),
                    ca_pem: directory.ca_pem().to_owned(),
                });
                Some(directory)
            };
            write_file(&manifest_out, &serde_json::to_string_pretty(&manifest)?)?;
            eprintln!(
                "trust bundle in {}, manifest in {}; Ctrl-C to stop",
                ca_out.display(),
                manifest_out.display()
            );
            tokio::signal::ctrl_c().await?;
            fleet.shutdown().await;
            drop(directory);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            plugin,
            scenario,
            json,
            targets_from_fleet,
            fleet_manifest,
            ca_out,
            directory,
            deadline_ms,
            jobs,
            nla_only_plugin,
            kerberos_plugin,
        } => {
            let scenario = Scenario::load(&scenario)?;
            let env = if targets_from_fleet {
                let manifest = load_manifest(&fleet_manifest)?;
                let remote = manifest.directory.as_ref().map(|d| DirectoryHandle::Remote {
                    url: d.ldaps_url.clone(),
                });
                SimEnv {
                    fleet: Fleet::from_manifest(manifest),
                    directory: remote,
                    kdc: None,
                }
            } else {
                let env = SimEnv::new(start_fleet(&scenario.targets).await?);
                if directory && !scenario.accounts.is_empty() {
                    env.with_directory(start_scenario_directory(&scenario).await?)
                } else {
                    env
                }
            };
            if let Some(path) = ca_out {
                write_file(&path, env.fleet.ca_pem())?;
            }
            let options = PlayOptions {
                deadline: Duration::from_millis(deadline_ms),
                jobs,
                nla_only_plugin,
                kerberos_plugin,
            };
            let results = play_with(&plugin, &scenario, &env, &options).await;
            if json {
                for r in &results {
                    emit(&format!("{}\n", serde_json::to_string(r)?))?;
                }
            } else {
                emit(&format_table(&results))?;
            }
            env.fleet.shutdown().await;
            Ok(if all_passed(&results) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Bench {
            plugin,
            concurrency,
            duration,
            scenario,
            nla,
            credential,
            fleet_manifest,
            baseline,
            plugin_pid,
            deadline_ms,
            json,
        } => {
            if !(duration.is_finite() && duration > 0.0) {
                return Err("--duration must be a positive number of seconds".into());
            }
            let scenario = match scenario {
                Some(path) => Some(Scenario::load(&path)?),
                None => None,
            };
            let mode = if nla {
                let credential = match &credential {
                    None => None,
                    Some(name) => Some(bench_credential(scenario.as_ref(), name)?),
                };
                BenchMode::Nla { credential }
            } else {
                BenchMode::Tls
            };
            let fleet = match (&scenario, fleet_manifest) {
                (_, Some(path)) => Fleet::from_manifest(load_manifest(&path)?),
                (Some(s), None) => start_fleet(&s.targets).await?,
                (None, None) if nla => start_fleet(&[default_nla_target()]).await?,
                (None, None) => start_fleet(&[TargetSpec::new("bench-healthy", Behavior::Healthy)]).await?,
            };
            let options = BenchOptions {
                mode: mode.clone(),
                concurrency,
                duration: Duration::from_secs_f64(duration),
                deadline: Duration::from_millis(deadline_ms),
                baseline,
                plugin_pid,
            };
            let report = bench(&plugin, &mode.targets(&fleet), &options).await?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                emit(&format_bench(&report))?;
            }
            fleet.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The account of `bench --nla` without a scenario.
const BENCH_ACCOUNT: &str = "bench";
const BENCH_PASSWORD: &str = "Bench-Pass-1";

/// The `nla_healthy` target `bench --nla` starts without a scenario; it knows [`BENCH_ACCOUNT`].
fn default_nla_target() -> TargetSpec {
    let mut target = TargetSpec::new("bench-nla", Behavior::NlaHealthy);
    target.nla.accounts = vec![Account {
        name: BENCH_ACCOUNT.to_owned(),
        password: BENCH_PASSWORD.to_owned(),
        state: "good".to_owned(),
        domain: None,
    }];
    target
}

/// The credential `--credential NAME` stands for: the scenario's account, or the default
/// target's.
fn bench_credential(scenario: Option<&Scenario>, name: &str) -> Result<BenchCredential, BoxError> {
    let account = match scenario {
        Some(s) => s
            .account(name)
            .cloned()
            .ok_or_else(|| format!("--credential {name}: no such [[account]] in the scenario"))?,
        None => default_nla_target()
            .nla
            .accounts
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| format!("--credential {name}: without --scenario the only account is `{BENCH_ACCOUNT}`"))?,
    };
    Ok(BenchCredential {
        username: account.name,
        domain: account.domain.unwrap_or_default(),
        password: account.password,
    })
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn write_file(path: &PathBuf, contents: &str) -> Result<(), BoxError> {
    std::fs::write(path, contents).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn load_manifest(path: &PathBuf) -> Result<FleetManifest, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?)
}

async fn start_scenario_directory(scenario: &Scenario) -> Result<Directory, BoxError> {
    let options = scenario
        .directory
        .as_ref()
        .map(DirectoryOptions::from)
        .unwrap_or_default();
    Ok(start_directory(&scenario.accounts, options).await?)
}
