use clap::Parser;

fn main() {
    let cli = dspark::cli::Cli::parse();
    if let Err(e) = dspark::cli::main_with(cli) {
        eprintln!("dspark: error: {e:#}");
        std::process::exit(1);
    }
}
