//! fanout's wire contract as data: channel names, client commands, server replies and
//! messages in both wire formats, WebSocket server framing and the Redis envelope. No I/O.

mod api;
mod channel;
mod command;
mod envelope;
mod error;
mod history;
mod message;
mod presence;
mod shard;
mod ws;

pub use api::{
    decode_api_batch, decode_api_history, decode_api_publish, decode_api_user, encode_api_batch, encode_api_error,
    encode_api_ok, encode_api_published, ApiPublish, BatchResult, MAX_BATCH_PUBLICATIONS, MAX_BROADCAST_CHANNELS,
    MAX_USER_LEN,
};
pub use channel::{namespace_of, ChannelError, ChannelName, MAX_CHANNEL_LEN};
pub use command::{decode_command, Command, CommandError, IDEMPOTENCY_WINDOW, MAX_IDEMPOTENCY_KEY};
pub use envelope::{decode_envelope, encode_envelope, redis_channel, Envelope, EnvelopeError, ENVELOPE_VERSION};
pub use error::ErrorCode;
pub use history::{
    encode_api_history, encode_history_reply, encode_resync, Epoch, HistoryPage, HistoryQuery, Position, MAX_EPOCH_LEN,
    MAX_HISTORY_LIMIT,
};
pub use message::{encode_message, encode_reply, transcode, validate_data, DataError, Encoding, Publication, Reply};
pub use presence::{
    decode_event_envelope, encode_api_presence, encode_api_presence_stats, encode_event_envelope,
    encode_presence_event, encode_presence_reply, encode_presence_stats_reply, PresenceEvent, PresenceList,
    PresenceStats, Present, MAX_PRESENCE_LIST,
};
pub use shard::{key_slot, shard_of, SLOTS};
pub use ws::{
    close_frame, frame, frame_header, parse_server_frame, write_client_frame, OpCode, ServerFrame, ServerFrameError,
    MAX_FRAME_HEADER,
};

/// Microseconds since the Unix epoch: the clock every publication's `ts` is stamped with.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
