//! Output records and their deterministic ids.
//!
//! Every output carries the header `sieve-id: <topic>/<partition>/<offset>/<n>`: the input
//! record it came from and its index among that record's outputs. After a crash the runner
//! reads output tails for these ids and produces only the missing outputs.

use rdkafka::message::{Headers, Message, OwnedMessage};

/// Header naming the input record an output came from.
pub const ID_HEADER: &str = "sieve-id";

/// An output to produce. `partition: None` lets the producer's partitioner pick by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    pub fn new(topic: impl Into<String>) -> Self {
        Output {
            topic: topic.into(),
            ..Default::default()
        }
    }

    /// A copy of `rec` (key, payload, headers) bound for `topic`.
    pub fn copy_of(topic: impl Into<String>, rec: &OwnedMessage) -> Self {
        let mut out = Output::new(topic);
        out.key = rec.key().map(<[u8]>::to_vec);
        out.payload = rec.payload().map(<[u8]>::to_vec);
        if let Some(hs) = rec.headers() {
            out.headers = hs
                .iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect();
        }
        out
    }

    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Identity of one output: which input record produced it, and which of its outputs it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputId {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub index: u32,
}

impl OutputId {
    pub fn encode(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.topic, self.partition, self.offset, self.index
        )
    }

    /// Parses an id; topic names may not contain '/', so the last three fields are numbers.
    pub fn parse(s: &str) -> Option<OutputId> {
        let mut it = s.rsplitn(4, '/');
        let index = it.next()?.parse().ok()?;
        let offset = it.next()?.parse().ok()?;
        let partition = it.next()?.parse().ok()?;
        let topic = it.next()?.to_string();
        Some(OutputId {
            topic,
            partition,
            offset,
            index,
        })
    }

    /// The id carried by a record's headers, if any.
    pub fn of(msg: &OwnedMessage) -> Option<OutputId> {
        header(msg, ID_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(OutputId::parse)
    }
}

/// First value of a header, by name.
pub fn header<'m>(msg: &'m OwnedMessage, name: &str) -> Option<&'m [u8]> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_with_dots_and_dashes_in_topic() {
        let id = OutputId {
            topic: "events.raw-v2".into(),
            partition: 3,
            offset: 123456,
            index: 2,
        };
        assert_eq!(OutputId::parse(&id.encode()), Some(id));
        assert_eq!(OutputId::parse("x/1/2"), None);
        assert_eq!(OutputId::parse("t/a/2/3"), None);
    }
}
