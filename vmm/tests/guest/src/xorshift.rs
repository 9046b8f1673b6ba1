//! The test's data stream: xorshift64, little-endian words. The guest init generates it and
//! the host test (vmm/tests/vsock_qemu.rs, which includes this file) checks every byte
//! against its own copy, so both must come from this one definition.

/// Fills `buf` with the next bytes of the stream, advancing `state`.
pub fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let mut x = *state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}
