//! Client commands in both wire formats: any bytes decode to a command or an error, never a
//! panic, and a decoded publish carries data that re-validates.
#![no_main]

use fanout_protocol::{decode_command, validate_data, Command, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [Encoding::Json, Encoding::MsgPack] {
        if let Ok(Command::Publish { channel, enc, data, .. }) = decode_command(format, data) {
            assert_eq!(enc, format);
            assert!(fanout_protocol::ChannelName::validate(channel.as_str()).is_ok());
            let _ = validate_data(enc, &data);
        }
    }
});
