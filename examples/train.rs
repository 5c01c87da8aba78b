//! Runs `train` or `eval` without the service binary:
//! `cargo run --release --example train -- train [flags]` or `... -- eval [flags]`.
//! The flags are the same as `mplug-search train` / `mplug-search eval`.

use clap::{Parser, Subcommand};
use mplug_search::train::{run_eval, run_train, EvalArgs, TrainArgs};

/// Training and evaluation of mPLUG checkpoints.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (from scratch, or on from --init-checkpoint) and write its checkpoint folder.
    Train(TrainArgs),
    /// Measure a checkpoint on held-out data and print the table.
    Eval(EvalArgs),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Command::Train(args) => {
            let summary = run_train(&args)?;
            let [itc, itm, cap, vqa] = summary.final_losses;
            println!(
                "trained {} parameters for {} steps in {:.0} s; final losses itc {itc:.4} \
                 itm {itm:.4} caption {cap:.4} vqa {vqa:.4}; wrote {}",
                summary.parameters,
                summary.steps,
                summary.seconds,
                summary.out.display()
            );
        }
        Command::Eval(args) => println!("{}", run_eval(&args)?),
    }
    Ok(())
}
