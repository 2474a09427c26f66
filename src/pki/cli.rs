//! `iotagent-mqtt pki <init|sign|revoke|crl|ca>`: the store from a shell. Data (certificates) goes to stdout,
//! messages to stderr.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{PkiError, Store};

/// The first argument that selects this mode instead of the service.
pub const COMMAND: &str = "pki";

/// Largest CSR or certificate read from stdin or a file.
const MAX_INPUT: u64 = 1024 * 1024;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Create the CA, the broker's and the service's certificates and the CRL; keep what exists and is valid.
    Init,
    /// Sign a device CSR (PEM or DER, on stdin or --csr); print the certificate (PEM). The CN must be tenant:device.
    Sign {
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
    },
    /// Revoke a certificate (PEM on stdin or --cert, or --serial HEX) and rewrite the CRL.
    Revoke {
        #[arg(long, value_name = "HEX", conflicts_with = "cert")]
        serial: Option<String>,
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
    /// Write the CRL (crl.pem) again.
    Crl,
    /// Print the CA certificate (PEM).
    Ca,
}

/// Runs one command against `store`.
pub fn run(command: &Command, store: &Store) -> ExitCode {
    match execute(command, store) {
        Ok(output) => {
            if std::io::stdout().write_all(&output).and_then(|()| std::io::stdout().flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pki: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: &Command, store: &Store) -> Result<Vec<u8>, PkiError> {
    match command {
        Command::Init => {
            let issued = store.init()?;
            eprintln!("pki: {} ready; issued: {issued:?}", store.settings().dir.display());
            Ok(Vec::new())
        }
        Command::Sign { csr } => Ok(store.sign(&input(csr.as_ref())?, None)?.to_pem()?),
        Command::Revoke { serial: Some(serial), .. } => {
            let revoked = store.revoke_serial(serial)?;
            eprintln!("pki: revoked {} ({})", revoked.serial, revoked.cn);
            Ok(Vec::new())
        }
        Command::Revoke { serial: None, cert } => {
            let revoked = store.revoke_certificate(&input(cert.as_ref())?)?;
            eprintln!("pki: revoked {} ({})", revoked.serial, revoked.cn);
            Ok(Vec::new())
        }
        Command::Crl => {
            store.write_crl()?;
            eprintln!("pki: {} written", store.path("crl.pem").display());
            Ok(Vec::new())
        }
        Command::Ca => Ok(store.ca_certificate()?.to_pem()?),
    }
}

fn input(file: Option<&PathBuf>) -> Result<Vec<u8>, PkiError> {
    let mut bytes = Vec::new();
    let (result, what) = match file {
        Some(path) => (
            std::fs::File::open(path).and_then(|f| f.take(MAX_INPUT + 1).read_to_end(&mut bytes)),
            path.display().to_string(),
        ),
        None => (std::io::stdin().take(MAX_INPUT + 1).read_to_end(&mut bytes), "stdin".into()),
    };
    result.map_err(PkiError::io(format!("read {what}")))?;
    if bytes.len() as u64 > MAX_INPUT {
        return Err(PkiError::Request(format!("{what} is larger than {MAX_INPUT} bytes")));
    }
    Ok(bytes)
}
