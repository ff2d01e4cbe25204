//! Compressed qcow2 clusters: raw deflate (compression type 0, "zlib")
//! and zstd (type 1). A cluster decompresses to exactly one cluster, as
//! QEMU requires; the output buffer is the cluster, so malformed input
//! never makes more.

use std::cell::RefCell;
use std::io;

use super::image::malformed;

/// A qcow2 compression type (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), type 0.
    Deflate,
    /// Zstandard, type 1.
    Zstd,
}

impl Compression {
    /// The type the header's byte names, if known.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Compression::Deflate),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Decompresses `input` into all of `out` (one cluster).
    pub fn decompress(self, input: &[u8], out: &mut [u8]) -> io::Result<()> {
        match self {
            Compression::Deflate => inflate(input, out),
            Compression::Zstd => unzstd(input, out),
        }
    }
}

thread_local! {
    static INFLATE: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(false));
}

/// Like QEMU: the output must fill the cluster; data after that (padding
/// to the sector) is ignored.
fn inflate(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    INFLATE.with_borrow_mut(|d| {
        d.reset(false);
        d.decompress(input, out, flate2::FlushDecompress::Finish)
            .map_err(|e| malformed(format!("compressed cluster: {e}")))?;
        if d.total_out() != out.len() as u64 {
            return Err(malformed(format!(
                "compressed cluster inflates to {} bytes, not {}",
                d.total_out(),
                out.len()
            )));
        }
        Ok(())
    })
}

thread_local! {
    static ZSTD: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
}

/// Like QEMU: decode until the cluster is full; the frame must end there.
fn unzstd(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    ZSTD.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = Some(zstd::stream::raw::Decoder::new()?);
        }
        let d = slot.as_mut().expect("decoder made above");
        d.reinit()?;
        let len = out.len();
        let mut src = InBuffer::around(input);
        let mut dst = OutBuffer::around(out);
        let mut left = 1;
        while dst.pos() < len {
            let (i, o) = (src.pos(), dst.pos());
            left = d
                .run(&mut src, &mut dst)
                .map_err(|e| malformed(format!("compressed cluster: {e}")))?;
            if src.pos() == i && dst.pos() == o {
                return Err(malformed(format!(
                    "compressed cluster decodes to {o} bytes, not {len}"
                )));
            }
        }
        if left != 0 {
            // Flush what the frame still holds: it must be nothing.
            let mut spare = [0u8; 1];
            let mut more = OutBuffer::around(&mut spare[..]);
            let left = d
                .run(&mut src, &mut more)
                .map_err(|e| malformed(format!("compressed cluster: {e}")))?;
            if left != 0 || more.pos() != 0 {
                return Err(malformed("compressed cluster decodes past the cluster"));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn deflate_and_zstd_fill_exactly_one_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = vec![0u8; data.len()];
        let mut z = deflate(&data);
        z.extend_from_slice(&[0xAB; 300]); // sector padding is ignored
        Compression::Deflate.decompress(&z, &mut out).unwrap();
        assert!(out == data);
        let s = zstd::bulk::compress(&data, 3).unwrap();
        let mut padded = s.clone();
        padded.extend_from_slice(&[0; 100]);
        out.fill(0);
        Compression::Zstd.decompress(&padded, &mut out).unwrap();
        assert!(out == data);
        // Too short, too long, garbage: errors, never more output.
        let mut small = vec![0u8; 1000];
        let mut big = vec![0u8; 70000];
        assert!(Compression::Deflate.decompress(&z, &mut big).is_err());
        assert!(Compression::Zstd.decompress(&s, &mut big).is_err());
        assert!(Compression::Zstd.decompress(&s, &mut small).is_err());
        assert!(Compression::Deflate
            .decompress(&[0xff; 64], &mut small)
            .is_err());
        assert!(Compression::Zstd
            .decompress(&[0xff; 64], &mut small)
            .is_err());
        assert!(Compression::Zstd.decompress(&[], &mut small).is_err());
    }
}
