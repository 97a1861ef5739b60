//! One layer's trip: fetch to a staging file, convert on a blocking thread, upload.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::Path;

use brisk_blobcache::digest::HashingWriter;
use brisk_blobcache::media::{layer_compression, Compression};
use brisk_blobcache::toc::{self, ConvertOptions, ConvertedLayer};
use brisk_blobcache::Digest;
use indicatif::{ProgressBar, ProgressStyle};
use oci_spec::image::Descriptor;
use serde::Serialize;

use super::{reorder, Run};
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub source_digest: Digest,
    pub source_media_type: String,
    pub source_size: u64,
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub tar_size: u64,
    pub chunks: usize,
    pub entries: usize,
    pub toc_digest: Digest,
    pub toc_position: String,
    /// Where the chunks listed for prefetch lie (`toc::ANNOTATION_PREFETCH_SPANS`).
    pub prefetch_spans: Vec<std::ops::Range<u64>>,
    /// False when the destination already had the converted blob.
    pub uploaded: bool,
}

pub(super) async fn convert_layer(
    run: &Run<'_>,
    index: usize,
    desc: &Descriptor,
    diff_id: Digest,
) -> Result<LayerSummary> {
    let digest: Digest = desc.digest().to_string().parse()?;
    let media_type = desc.media_type().to_string();
    let compression = layer_compression(&media_type)
        .ok_or_else(|| brisk_blobcache::Error::UnsupportedMediaType(media_type.clone()))?;
    let size = desc.size();

    let bar = run.bars.add(ProgressBar::new(size));
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} {msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("layer {index}"));
    bar.set_message("fetching");

    let staging = match &run.config.tmp_dir {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .map_err(|e| Error::io("staging directory", e))?;
    let input = staging.path().join("input");
    let output = staging.path().join("output");
    run.src.blob_to_file(&digest, size, &input).await?;

    bar.set_message("converting");
    let opts = ConvertOptions {
        chunk_size: run.config.chunk_size,
        level: run.config.level,
        prefetch_level: run.config.prefetch_level,
        prefetch_chunk_size: run.config.prefetch_chunk_size,
        scattered: run.config.scattered,
        prefetch_files: Vec::new(),
        prefetch_ranges: run
            .config
            .trace_ranges
            .iter()
            .filter_map(|(path, r)| {
                Some((brisk_blobcache::toc::normalize_name(path).ok()?, r.clone()))
            })
            .collect(),
    };
    let (inp, outp, b) = (input.clone(), output.clone(), bar.clone());
    let trace_files = run.config.trace_files.clone();
    let converted = tokio::task::spawn_blocking(move || {
        convert_file(&inp, compression, &outp, &opts, &b, &trace_files, diff_id)
    })
    .await
    .map_err(Error::Task)??;

    bar.set_message("uploading");
    let uploaded = run.dst.put_blob_file(&converted.digest, &output).await?;
    bar.finish_with_message(if uploaded { "done" } else { "exists" });
    Ok(LayerSummary {
        source_digest: digest,
        source_media_type: media_type,
        source_size: size,
        digest: converted.digest,
        size: converted.size,
        diff_id: converted.diff_id,
        tar_size: converted.tar_size,
        chunks: converted.chunks,
        entries: converted.entries,
        toc_digest: converted.toc_digest,
        toc_position: converted.toc.to_string(),
        prefetch_spans: converted.prefetch_spans.clone(),
        uploaded,
    })
}

/// Decompresses `input` as `compression` says and converts it into `output`, checking the
/// uncompressed content against the config's `diff_id`. With `trace_files`, the traced files
/// of this layer move to the front first (the result then has a new diff_id).
pub fn convert_file(
    input: &Path,
    compression: Compression,
    output: &Path,
    opts: &ConvertOptions,
    bar: &ProgressBar,
    trace_files: &[String],
    diff_id: Digest,
) -> Result<ConvertedLayer> {
    let file = File::open(input).map_err(|e| Error::io(input, e))?;
    let counted = BufReader::with_capacity(256 * 1024, bar.wrap_read(file));
    let mut tar: Box<dyn Read> = match compression {
        Compression::None => Box::new(counted),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(counted).map_err(|e| Error::io(input, e))?,
        ),
    };
    if trace_files.is_empty() {
        let converted = write_layer(tar, output, opts)?;
        check_diff_id(diff_id, converted.diff_id)?;
        return Ok(converted);
    }
    // Reordering needs random access: stage the uncompressed tar, checking it on the way.
    let plain = output.with_extension("tar");
    let staged = File::create(&plain).map_err(|e| Error::io(&plain, e))?;
    let mut writer = HashingWriter::new(BufWriter::with_capacity(256 * 1024, staged));
    std::io::copy(&mut tar, &mut writer)
        .map_err(|e| brisk_blobcache::Error::Toc(brisk_blobcache::toc::TocError::Tar(e)))?;
    let (original, _, staged) = writer.finish();
    staged
        .into_inner()
        .map_err(|e| Error::io(&plain, e.into_error()))?;
    check_diff_id(diff_id, original)?;
    let planned = reorder::plan(&plain, trace_files)?;
    let converted = match planned {
        None => write_layer(
            File::open(&plain).map_err(|e| Error::io(&plain, e))?,
            output,
            opts,
        )?,
        Some(plan) => {
            let opts = ConvertOptions {
                prefetch_files: plan.files,
                ..opts.clone()
            };
            write_layer(
                reorder::Segments::new(&plain, plan.segments)?,
                output,
                &opts,
            )?
        }
    };
    let _ = std::fs::remove_file(&plain);
    Ok(converted)
}

fn check_diff_id(expected: Digest, actual: Digest) -> Result<()> {
    if expected != actual {
        return Err(Error::DiffIdMismatch { expected, actual });
    }
    Ok(())
}

fn write_layer(tar: impl Read, output: &Path, opts: &ConvertOptions) -> Result<ConvertedLayer> {
    let out = File::create(output).map_err(|e| Error::io(output, e))?;
    let (converted, out) =
        toc::convert_layer(tar, BufWriter::with_capacity(256 * 1024, out), opts)?;
    out.into_inner()
        .map_err(|e| Error::io(output, e.into_error()))?;
    Ok(converted)
}
