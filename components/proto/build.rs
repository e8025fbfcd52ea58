//! Compiles every `.proto` file under `<workspace>/proto/` with tonic/prost.
//!
//! Include roots are `proto/etcd` (imports like `"mvccpb/kv.proto"`) and
//! `proto/metastore` (imports like `"metapb.proto"`). New files dropped
//! anywhere under `proto/` are picked up automatically.

use std::io;
use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;

    let mut protos = Vec::new();
    collect_protos(&proto_root, &mut protos)?;
    protos.sort();

    // Relative to the package root, so cargo checks the files of the
    // checkout being built: with absolute paths, a target dir shared by two
    // checkouts (a worktree, CI's fresh clone) keeps watching the files of
    // whichever checkout ran this script last and reuses its generated
    // code.
    println!("cargo:rerun-if-changed=../../proto");
    for proto in &protos {
        if let Ok(rel) = proto.strip_prefix(&proto_root) {
            println!("cargo:rerun-if-changed=../../proto/{}", rel.display());
        }
    }

    // Use the vendored protoc so the build does not depend on the host.
    // Setting env vars in a (single-threaded) build script is fine.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);

    let includes = [proto_root.join("etcd"), proto_root.join("metastore")];

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &includes)?;
    Ok(())
}
