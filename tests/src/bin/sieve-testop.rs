//! Test operators on the core runtime, run as child processes by the end-to-end tests:
//! `passthrough` copies records, `counter` keeps a per-key count in state and emits it.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use rdkafka::message::{Message, OwnedMessage};
use sieve_core::config::{KafkaArgs, ServiceArgs};
use sieve_core::operator::{Ctx, Operator, OperatorFactory};
use sieve_core::record::Output;
use sieve_core::store::{PartitionStore, DEFAULT_CF};

#[derive(Parser)]
struct Cli {
    #[arg(value_enum)]
    op: Op,
    #[arg(long, default_value = "in")]
    input: String,
    #[arg(long, default_value = "out")]
    output: String,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(ValueEnum, Clone, Copy)]
enum Op {
    Passthrough,
    Counter,
}

struct Factory {
    op: Op,
    input: String,
    output: String,
}

struct Passthrough {
    output: String,
}

impl Operator for Passthrough {
    fn process(&mut self, r: &OwnedMessage, ctx: &mut Ctx<'_>) -> sieve_core::Result<()> {
        let mut out = Output::new(&self.output);
        out.key = r.key().map(<[u8]>::to_vec);
        out.payload = r.payload().map(<[u8]>::to_vec);
        ctx.emit(out);
        Ok(())
    }
}

struct Counter {
    output: String,
}

impl Operator for Counter {
    fn process(&mut self, r: &OwnedMessage, ctx: &mut Ctx<'_>) -> sieve_core::Result<()> {
        let key = r.key().unwrap_or_default();
        let n = ctx
            .get(DEFAULT_CF, key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
            + 1;
        ctx.put(DEFAULT_CF, key, &n.to_be_bytes());
        ctx.emit(Output::new(&self.output).key(key).payload(n.to_string()));
        Ok(())
    }
}

enum AnyOp {
    Passthrough(Passthrough),
    Counter(Counter),
}

impl Operator for AnyOp {
    fn process(&mut self, r: &OwnedMessage, ctx: &mut Ctx<'_>) -> sieve_core::Result<()> {
        match self {
            AnyOp::Passthrough(o) => o.process(r, ctx),
            AnyOp::Counter(o) => o.process(r, ctx),
        }
    }
}

impl OperatorFactory for Factory {
    type Op = AnyOp;
    fn inputs(&self) -> Vec<String> {
        vec![self.input.clone()]
    }
    fn outputs(&self) -> Vec<String> {
        vec![self.output.clone()]
    }
    fn open(&self, _: &str, _: i32, _: &PartitionStore) -> sieve_core::Result<AnyOp> {
        let output = self.output.clone();
        Ok(match self.op {
            Op::Passthrough => AnyOp::Passthrough(Passthrough { output }),
            Op::Counter => AnyOp::Counter(Counter { output }),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sieve_core::telemetry::init_logs(cli.service.log_format);
    let factory = Factory {
        op: cli.op,
        input: cli.input,
        output: cli.output,
    };
    match sieve_core::service::run_processor(factory, &cli.kafka, &cli.service, axum::Router::new())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
