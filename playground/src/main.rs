//! The `nimbus` command: `nimbus playground up|down` (all of Nimbus on one machine).

use std::path::PathBuf;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Playground { command } = Cli::parse().command;
    match command {
        PlaygroundCommand::Up(PlaygroundArgs { dir, instances, zones, isolate_zones }) => {
            if zones < 3 {
                anyhow::bail!("--zones must be at least 3: a replica set needs three zones");
            }
            let pg = playground::up(&dir, &instances, zones, isolate_zones).await?;
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
        PlaygroundCommand::Zone { dir, zone, state } => {
            playground::set_zone(&dir, &zone, state).await?;
            println!("zone {zone}: {state:?}");
            Ok(())
        }
        PlaygroundCommand::Serve(PlaygroundArgs { dir, instances, zones, isolate_zones }) => {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
            playground::serve::serve(playground::serve::Options { dir, instances, zones, isolate_zones }).await
        }
    }
}
