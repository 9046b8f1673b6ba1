//! Virtio-vsock packets on descriptor chains.
//!
//! TX chains are parsed with the `virtio-vsock` crate's [`VsockPacket`] when the chain has the
//! layout that parser understands (header alone, header+data in one descriptor, or a 44-byte
//! header descriptor followed by one data descriptor that holds the whole payload). Any other
//! layout (header split over descriptors, payload spread over several descriptors, as Linux 6.x
//! produces for large sends) goes through virtio-queue's scatter-gather `Reader`, so no byte of a
//! valid packet is dropped. RX chains are always filled through `Writer`, which accepts any
//! layout of writable descriptors.
//!
//! Every guest address goes through vm-memory's checked accessors: a descriptor pointing outside
//! guest memory yields an error, never an access.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Reader, Writer};
use virtio_vsock::packet::{Error as VsockPacketError, VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::GuestMemory;

/// Size of the virtio-vsock packet header on the wire.
pub const HDR_SIZE: usize = PKT_HEADER_SIZE;

/// Largest payload one packet may carry (the Linux driver's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// Well-known CID of the host.
pub const HOST_CID: u64 = 2;

/// Socket type: stream (the only one this device offers).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio spec 5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// Half or full close; see [`super::shutdown`].
    pub const SHUTDOWN: u16 = 4;
    /// Stream payload.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Ask the peer for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Flags of a SHUTDOWN packet.
pub mod shutdown {
    /// The sender will not receive any more data.
    pub const RCV: u32 = 1;
    /// The sender will not send any more data.
    pub const SEND: u32 = 2;
}

/// A decoded virtio-vsock header (host byte order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation, see [`op`].
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a little-endian wire header.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn from_vsock_packet<B: BitmapSlice>(p: &VsockPacket<'_, B>) -> Self {
        Header {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }
}

/// Why a descriptor chain could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain is malformed or points outside guest memory.
    #[error("invalid descriptor chain: {0}")]
    Chain(String),
    /// The chain is too short for a header.
    #[error("chain holds {0} bytes, less than a packet header")]
    TooShort(usize),
    /// The header announces more payload than allowed.
    #[error("header len {0} exceeds the maximum payload")]
    LenTooLarge(u32),
    /// The header announces more payload than the chain holds.
    #[error("header len {len} but the chain holds only {avail} payload bytes")]
    Truncated {
        /// Announced length.
        len: u32,
        /// Bytes present.
        avail: usize,
    },
}

/// Reads the packet in a TX chain: returns its header; the payload (exactly `header.len` bytes)
/// is left in `data[..header.len]`. `data` must be at least [`MAX_PKT_DATA`] long.
pub fn read_tx_packet<'a, M, T, B>(
    mem: &'a M,
    chain: DescriptorChain<T>,
    data: &mut [u8],
) -> Result<Header, PacketError>
where
    M: GuestMemory,
    <M as GuestMemory>::Bitmap: WithBitmapSlice<'a, S = B>,
    B: BitmapSlice,
    T: Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let max = data.len().min(MAX_PKT_DATA);
    if simple_tx_layout(&chain) {
        let mut c = chain.clone();
        match VsockPacket::from_tx_virtq_chain(mem, &mut c, max as u32) {
            Ok(p) => {
                let hdr = Header::from_vsock_packet(&p);
                if let Some(s) = p.data_slice() {
                    let n = s.len().min(hdr.len as usize);
                    if n != hdr.len as usize {
                        return Err(PacketError::Truncated {
                            len: hdr.len,
                            avail: n,
                        });
                    }
                    s.copy_to(&mut data[..n]);
                }
                return Ok(hdr);
            }
            Err(VsockPacketError::InvalidHeaderLen(l)) => return Err(PacketError::LenTooLarge(l)),
            // Layout the single-descriptor parser does not handle: fall through to the
            // scatter-gather path, which handles any layout.
            Err(VsockPacketError::DescriptorLengthTooSmall)
            | Err(VsockPacketError::DescriptorChainTooShort)
            | Err(VsockPacketError::FragmentedMemory) => {}
            Err(e) => return Err(PacketError::Chain(e.to_string())),
        }
    }
    let mut reader = Reader::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
    let avail = reader.available_bytes();
    if avail < HDR_SIZE {
        return Err(PacketError::TooShort(avail));
    }
    let mut hb = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut hb)
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    let hdr = Header::from_bytes(&hb);
    let len = hdr.len as usize;
    if len > max {
        return Err(PacketError::LenTooLarge(hdr.len));
    }
    let rest = reader.available_bytes();
    if rest < len {
        return Err(PacketError::Truncated {
            len: hdr.len,
            avail: rest,
        });
    }
    reader
        .read_exact(&mut data[..len])
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    Ok(hdr)
}

/// Whether the chain has a layout `VsockPacket::from_tx_virtq_chain` reads completely:
/// one descriptor, or a head of exactly one header followed by one last data descriptor.
/// (That parser takes a multi-descriptor chain's payload from the second descriptor only, so
/// any other shape would lose or misplace bytes.)
fn simple_tx_layout<T>(chain: &DescriptorChain<T>) -> bool
where
    T: Deref + Clone,
    T::Target: GuestMemory,
{
    let mut it = chain.clone();
    let Some(head): Option<Descriptor> = it.next() else {
        return false;
    };
    if !head.has_next() {
        return true;
    }
    if head.len() as usize != HDR_SIZE {
        return false;
    }
    match it.next() {
        Some(d) => !d.has_next(),
        None => false,
    }
}

/// An RX chain ready to be filled.
pub struct RxBuffer<'a, B: BitmapSlice> {
    writer: Writer<'a, B>,
}

impl<'a, B: BitmapSlice> RxBuffer<'a, B> {
    /// Wraps the writable descriptors of `chain`, validating every address.
    pub fn new<M, T>(mem: &'a M, chain: DescriptorChain<T>) -> Result<Self, PacketError>
    where
        M: GuestMemory,
        <M as GuestMemory>::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory + Sized,
    {
        let writer = Writer::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
        Ok(RxBuffer { writer })
    }

    /// Payload bytes a packet in this buffer may carry (0 if not even a header fits).
    pub fn data_capacity(&self) -> usize {
        self.writer
            .available_bytes()
            .saturating_sub(HDR_SIZE)
            .min(MAX_PKT_DATA)
    }

    /// Whether a header fits at all.
    pub fn fits_header(&self) -> bool {
        self.writer.available_bytes() >= HDR_SIZE
    }

    /// Writes header and payload; returns the used length to report.
    pub fn write(mut self, hdr: &Header, data: &[u8]) -> Result<u32, PacketError> {
        if self.writer.available_bytes() < HDR_SIZE + data.len() {
            return Err(PacketError::TooShort(self.writer.available_bytes()));
        }
        self.writer
            .write_all(&hdr.to_bytes())
            .and_then(|_| self.writer.write_all(data))
            .map_err(|e| PacketError::Chain(e.to_string()))?;
        Ok((HDR_SIZE + data.len()) as u32)
    }
}
