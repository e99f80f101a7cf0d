//! Which Redis a channel lives on when there is more than one: Redis Cluster's key slot,
//! and the documented shard choice for independent Redis servers (`redis_shards`).
//!
//! Both start from the channel's Redis channel name (`{prefix}{channel}`), so a backend
//! that publishes straight into Redis computes the same answer with any Redis client's
//! slot function (or `CLUSTER KEYSLOT`), then `% shards`. CRC16 is written out here: it
//! is eight lines, and the crates that offer it bring tables and features we do not need.

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial 0, no reflection): Redis Cluster's hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Redis Cluster's `HASH_SLOT(key)`: CRC16 of the key, or of the text between its first
/// `{` and the next `}` when that text is not empty (a hash tag), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// The shard, out of `shards` independent Redis servers, that carries the Redis channel
/// `redis_channel`: `key_slot(redis_channel) % shards`. `shards` must be at least 1.
pub fn shard_of(redis_channel: &str, shards: usize) -> usize {
    usize::from(key_slot(redis_channel.as_bytes())) % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from the Redis Cluster specification and `CLUSTER KEYSLOT` on Redis 7.0
    /// (the integration tests check the same against a live cluster).
    #[test]
    fn matches_redis_cluster() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn the_documented_shard_vectors() {
        // docs/protocol.md lists these; backends check their own implementation with them.
        let vectors = [
            ("fanout:news", 1203, 0, 3),
            ("fanout:chat:lobby", 8150, 2, 0),
            ("fanout:h:x", 12448, 1, 8),
            ("fanout:a", 2487, 0, 7),
            ("fanout:{room}:1", 15960, 0, 0),
        ];
        for (name, slot, of3, of10) in vectors {
            assert_eq!(key_slot(name.as_bytes()), slot, "{name}");
            assert_eq!((shard_of(name, 3), shard_of(name, 10)), (of3, of10), "{name}");
        }
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("anything", 0), 0, "no shards is treated as one");
    }
}
