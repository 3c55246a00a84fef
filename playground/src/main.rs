//! The `nimbus` command: `nimbus playground up|apply|delete|backup|restore|zone|down` (all of Nimbus on
//! one machine).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nimbus_playground as playground;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "nimbus", version, about = "Nimbus on one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The playground: etcd, datanodes in three zones, the gateway and the control plane.
    Playground {
        #[command(subcommand)]
        command: PlaygroundCommand,
    },
}

#[derive(Subcommand)]
enum PlaygroundCommand {
    /// Start everything and return once every instance is Ready.
    Up(PlaygroundArgs),
    /// Fail or heal a zone: `down` kills its processes and keeps them down, `partition`
    /// cuts it off from the other zones, `isolate` from everything, `up` heals it.
    Zone {
        #[arg(long, default_value = ".playground")]
        dir: PathBuf,
        /// The zone (a, b, c, ...).
        zone: String,
        /// up, down, partition or isolate.
        state: playground::netns::ZoneState,
    },
    /// `kubectl apply` for a running playground: DatabaseInstance and ResourcePool
    /// manifests (multi-document YAML). New instances are provisioned, changed ones
    /// reconciled, new pools created; an invalid manifest changes nothing.
    Apply {
        #[arg(long, default_value = ".playground")]
        dir: PathBuf,
        /// Manifest files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Return once every instance of the files is Ready on its pool, with no migration
        /// running; fail when a migration was aborted or an instance failed.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits: seconds, or a number with s, m or h.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Delete instances: their data, route, users and limits. An unknown name deletes nothing.
    Delete {
        #[arg(long, default_value = ".playground")]
        dir: PathBuf,
        /// Instance names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Take a full backup of an instance now; prints `backup: ID at RFC3339`.
    Backup {
        #[arg(long, default_value = ".playground")]
        dir: PathBuf,
        /// Instance name.
        name: String,
    },
    /// Restore an instance (or some of its collections) to a moment of its recoverable
    /// window, in place or into a new instance; prints `restored to: RFC3339`.
    Restore {
        #[arg(long, default_value = ".playground")]
        dir: PathBuf,
        /// Instance name.
        name: String,
        /// RFC 3339 (`2026-11-28T10:00:00Z`), or `latest`.
        #[arg(long)]
        to_time: String,
        /// Only these collections (comma-separated); the others stay as they are.
        #[arg(long, value_delimiter = ',')]
        collections: Option<Vec<String>>,
        /// Restore into this new instance (created with the source's spec) instead of in
        /// place.
        #[arg(long)]
        into: Option<String>,
    },
    /// Stop everything `up` started (the data stays in the directory).
    Down {
        #[arg(long, default_value = ".playground")]
        dir: PathBuf,
    },
    /// The control plane itself (what `up` runs in the background, with the same arguments).
    #[command(hide = true)]
    Serve(PlaygroundArgs),
}

/// What the playground runs: `up` checks them and passes them on to `serve`.
#[derive(Args)]
struct PlaygroundArgs {
    /// Directory of the playground's data, logs and playground.json.
    #[arg(long, default_value = ".playground")]
    dir: PathBuf,
    /// DatabaseInstance manifests to provision (default: examples/database-instance.yaml).
    #[arg(long)]
    instances: Vec<PathBuf>,
    /// Number of zones (at least 3).
    #[arg(long, default_value_t = 3)]
    zones: usize,
    /// Run each zone's datanodes in their own Linux network namespace, so that
    /// `zone ... partition|isolate` can cut a zone's network (needs root, iproute2
    /// and iptables). Kept for the directory's life.
    #[arg(long)]
    isolate_zones: bool,
    /// After a migration's switch, how long the source keeps its copy of the database
    /// before dropping it: seconds, or a number with s, m or h.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    migration_cleanup_grace: Duration,
    /// The most a migration's copy reads from its source, in MiB per second (below it
    /// the copy slows down by itself when the source's or the target's requests queue).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    migration_copy_mib_per_sec: u64,
    /// How long a migration's catch-up (after its copy) may take to get close enough to
    /// hold before the attempt aborts (nothing lost) and is retried later: seconds, or a
    /// number with s, m or h; 0: no limit.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    migration_catch_up_timeout: Duration,
}

impl PlaygroundArgs {
    fn migration(&self) -> playground::MigrationFlags {
        playground::MigrationFlags {
            cleanup_grace: self.migration_cleanup_grace,
            copy_mib_per_sec: self.migration_copy_mib_per_sec,
            catch_up_timeout: self.migration_catch_up_timeout,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Playground { command } = Cli::parse().command;
    match command {
        PlaygroundCommand::Up(args) => {
            if args.zones < 3 {
                anyhow::bail!("--zones must be at least 3: a replica set needs three zones");
            }
            let PlaygroundArgs { ref dir, ref instances, zones, isolate_zones, .. } = args;
            let pg = playground::up(dir, instances, zones, isolate_zones, args.migration()).await?;
            println!("playground is up: {}", dir.join(playground::state::PLAYGROUND_FILE).display());
            println!("gateway: {}", pg.gateway);
            for (name, i) in &pg.instances {
                println!("instance {name}: database {} on {} ({})", i.database, i.replica_set, i.phase);
                println!("  token:           {}", i.token);
                println!("  read-only token: {}", i.read_only_token);
                println!(
                    "  try: curl -s -H 'Authorization: Bearer {}' -H 'content-type: application/json' \
                     -d '{{\"documents\":[{{\"hello\":\"nimbus\"}}]}}' {}/v1/databases/{}/collections/hello/documents",
                    i.token, pg.gateway, i.database
                );
            }
            Ok(())
        }
        PlaygroundCommand::Down { dir } => {
            if playground::down(&dir).await? {
                println!("playground stopped (data kept in {})", dir.display());
            } else {
                println!("no playground running in {}", dir.display());
            }
            Ok(())
        }
        PlaygroundCommand::Apply { dir, files, wait, timeout } => {
            for line in playground::apply(&dir, &files, wait.then_some(timeout)).await? {
                println!("{line}");
            }
            Ok(())
        }
        PlaygroundCommand::Delete { dir, names } => {
            for line in playground::delete(&dir, &names).await? {
                println!("{line}");
            }
            Ok(())
        }
        PlaygroundCommand::Backup { dir, name } => {
            for line in playground::backup(&dir, &name).await? {
                println!("{line}");
            }
            Ok(())
        }
        PlaygroundCommand::Restore { dir, name, to_time, collections, into } => {
            for line in playground::restore(&dir, &name, &to_time, collections, into).await? {
                println!("{line}");
            }
            Ok(())
        }
        PlaygroundCommand::Zone { dir, zone, state } => {
            playground::set_zone(&dir, &zone, state).await?;
            println!("zone {zone}: {state:?}");
            Ok(())
        }
        PlaygroundCommand::Serve(args) => {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
            let migration = args.migration();
            let PlaygroundArgs { dir, instances, zones, isolate_zones, .. } = args;
            let opts = playground::serve::Options { dir, instances, zones, isolate_zones, migration };
            playground::serve::serve(opts).await
        }
    }
}

/// `600`, `600s`, `10m` or `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{s:?}: a number of seconds, or with s, m or h"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: the unit is s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up_args(extra: &[&str]) -> Result<PlaygroundArgs, clap::Error> {
        let argv = ["nimbus", "playground", "up"].iter().chain(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Playground { command: PlaygroundCommand::Up(args) } => Ok(args),
            Command::Playground { .. } => panic!("not `up`"),
        }
    }

    #[test]
    fn the_copy_ceiling_defaults_to_64_mib_per_second_and_is_at_least_one() {
        assert_eq!(up_args(&[]).unwrap().migration_copy_mib_per_sec, 64);
        assert_eq!(up_args(&["--migration-copy-mib-per-sec", "8"]).unwrap().migration_copy_mib_per_sec, 8);
        for bad in ["0", "-1", "fast", "1048577"] {
            let flag = format!("--migration-copy-mib-per-sec={bad}");
            let err = up_args(&[&flag]).err().expect("refused");
            assert!(err.to_string().contains("--migration-copy-mib-per-sec"), "{err}");
        }
    }

    #[test]
    fn the_catch_up_budget_defaults_to_ten_minutes_and_reaches_the_control_plane() {
        assert_eq!(up_args(&[]).unwrap().migration_catch_up_timeout, Duration::from_secs(600));
        let args = up_args(&["--migration-catch-up-timeout", "90s"]).unwrap();
        assert_eq!(args.migration().catch_up_timeout, Duration::from_secs(90));
        assert_eq!(up_args(&["--migration-catch-up-timeout=0"]).unwrap().migration_catch_up_timeout, Duration::ZERO);
        let err = up_args(&["--migration-catch-up-timeout=soon"]).err().expect("refused");
        assert!(err.to_string().contains("--migration-catch-up-timeout"), "{err}");
        // `up` passes it on to `serve` as whole seconds, which `serve` reads back.
        let argv = ["nimbus", "playground", "serve", "--migration-catch-up-timeout", "90s"];
        let Command::Playground { command: PlaygroundCommand::Serve(args) } =
            Cli::try_parse_from(argv).unwrap().command
        else {
            panic!("not `serve`")
        };
        assert_eq!(args.migration().catch_up_timeout, Duration::from_secs(90));
    }
}
