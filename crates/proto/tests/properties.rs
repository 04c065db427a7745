//! Property tests: arbitrary messages round-trip, arbitrary bytes never panic the decoder.
#![allow(clippy::unwrap_used)]

use isocell_proto::{
    decode, encode, fuzz_decode, read_frame, DecodeError, EntryKind, ExecRequest, ExitStatus,
    FrameBuffer, Message, Privileges, WindowSize,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..300)
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z/._-]{0,20}"]
}

fn exec_request() -> impl Strategy<Value = ExecRequest> {
    (
        vec(text(), 0..6),
        vec((text(), text()), 0..6),
        proptest::option::of(text()),
        any::<u32>(),
        any::<u32>(),
        vec(any::<u32>(), 0..16),
        any::<bool>(),
        option::of(privileges()),
    )
        .prop_map(|(argv, env, cwd, uid, gid, groups, stdin, privileges)| ExecRequest {
            argv,
            env,
            cwd,
            uid,
            gid,
            groups,
            stdin,
            privileges,
        })
}

fn privileges() -> impl Strategy<Value = Privileges> {
    (any::<[u64; 5]>(), any::<bool>()).prop_map(|(s, no_new_privs)| Privileges {
        bounding: s[0],
        effective: s[1],
        permitted: s[2],
        inheritable: s[3],
        ambient: s[4],
        no_new_privs,
    })
}

fn message() -> impl Strategy<Value = Message> {
    let exit = prop_oneof![
        any::<i32>().prop_map(ExitStatus::Code),
        any::<i32>().prop_map(ExitStatus::Signal)
    ];
    let kind = prop_oneof![Just(EntryKind::File), Just(EntryKind::Dir)];
    prop_oneof![
        (any::<u16>(), text()).prop_map(|(version, agent)| Message::Hello { version, agent }),
        any::<u16>().prop_map(|version| Message::Welcome { version }),
        exec_request().prop_map(Message::Exec),
        bytes().prop_map(Message::Stdin),
        Just(Message::StdinEof),
        any::<i32>().prop_map(Message::Signal),
        bytes().prop_map(Message::Stdout),
        bytes().prop_map(Message::Stderr),
        any::<u32>().prop_map(|pid| Message::Started { pid }),
        (any::<i32>(), text()).prop_map(|(errno, message)| Message::ExecFailed { errno, message }),
        exit.prop_map(Message::Exited),
        (text(), any::<u32>(), any::<u64>()).prop_map(|(path, mode, size)| Message::PutFile {
            path,
            mode,
            size
        }),
        (text(), any::<u32>()).prop_map(|(path, mode)| Message::MakeDir { path, mode }),
        text().prop_map(|path| Message::GetPath { path }),
        (text(), kind, any::<u32>(), any::<u64>())
            .prop_map(|(path, kind, mode, size)| Message::Entry { path, kind, mode, size }),
        bytes().prop_map(Message::Data),
        Just(Message::DataEnd),
        Just(Message::Done),
        text().prop_map(|message| Message::Error { message }),
        Just(Message::Shutdown),
        (any::<u64>(), option::of((any::<u16>(), any::<u16>())), exec_request()).prop_map(
            |(id, tty, exec)| Message::ExecSession {
                id,
                tty: tty.map(|(rows, cols)| WindowSize { rows, cols }),
                exec,
            }
        ),
        (any::<u16>(), any::<u16>())
            .prop_map(|(rows, cols)| Message::Resize(WindowSize { rows, cols })),
        any::<u64>().prop_map(|id| Message::WaitSession { id }),
        (any::<u64>(), any::<i32>()).prop_map(|(id, signal)| Message::SignalSession { id, signal }),
        Just(Message::PrepareSnapshot),
        text().prop_map(|path| Message::MakeReadOnly { path }),
        (bytes(), any::<u64>())
            .prop_map(|(entropy, unix_time_ns)| Message::Reseed { entropy, unix_time_ns }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn messages_round_trip(msg in message()) {
        let frame = encode(&msg);
        prop_assert_eq!(frame[..4].to_vec(), u32::try_from(frame.len() - 4).unwrap().to_le_bytes().to_vec());
        prop_assert_eq!(decode(&frame[4..]), Ok(msg.clone()));
        prop_assert_eq!(read_frame(&mut frame.as_slice()).unwrap(), Some(msg));
    }

    #[test]
    fn frame_buffer_round_trips_any_split(
        msgs in vec(message(), 1..8),
        sizes in vec(1usize..64, 1..32),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        let mut rest = stream.as_slice();
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at((*size).min(rest.len()));
            rest = tail;
            fb.push(piece);
            while let Some(msg) = fb.next_message().unwrap() {
                got.push(msg);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(fb.next_message(), Ok(None));
    }

    #[test]
    fn every_strict_prefix_fails(msg in message()) {
        let frame = encode(&msg);
        let body = &frame[4..];
        for end in 0..body.len() {
            prop_assert_eq!(decode(&body[..end]), Err(DecodeError::Truncated));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
        let _ = decode(&data);
        fuzz_decode(&data);
    }

    #[test]
    fn mutated_frames_never_panic(
        msgs in vec(message(), 1..4),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        // Near-valid input reaches deeper into the decoder than random bytes do.
        let mut stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        for (at, byte) in flips {
            let i = at.index(stream.len());
            stream[i] = byte;
        }
        let end = cut.index(stream.len() + 1);
        fuzz_decode(&stream[..end]);
        fuzz_decode(&stream[4..end.max(4)]);
    }
}
