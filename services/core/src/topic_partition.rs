//! One partition of one topic: the key of everything the runtime tracks per partition.
//!
//! Stored in `PartitionMeta` maps as the string `topic/partition` (Kafka topic names cannot
//! hold `/`), so stores and changelogs written before this type existed still read.

use std::fmt;
use std::str::FromStr;

use rdkafka::message::Message;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }

    /// The partition a consumed record came from.
    pub fn of(msg: &impl Message) -> Self {
        TopicPartition::new(msg.topic(), msg.partition())
    }

    /// Whether `msg` was read from this partition.
    pub fn holds(&self, msg: &impl Message) -> bool {
        msg.partition() == self.partition && msg.topic() == self.topic
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a topic/partition: {0:?}")]
pub struct ParseError(String);

impl FromStr for TopicPartition {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (topic, partition) = s.rsplit_once('/').ok_or_else(|| ParseError(s.into()))?;
        let partition = partition.parse().map_err(|_| ParseError(s.into()))?;
        if topic.is_empty() {
            return Err(ParseError(s.into()));
        }
        Ok(TopicPartition::new(topic, partition))
    }
}

impl Serialize for TopicPartition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TopicPartition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = TopicPartition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string `topic/partition`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TopicPartition, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn map_keys_keep_the_string_form_stores_already_hold() {
        let stored = r#"{"dedup.out/3":17,"a.b-c_d/12":-1}"#;
        let map: BTreeMap<TopicPartition, i64> = serde_json::from_str(stored).unwrap();
        assert_eq!(map[&TopicPartition::new("dedup.out", 3)], 17);
        assert_eq!(map[&TopicPartition::new("a.b-c_d", 12)], -1);
        let back: BTreeMap<String, i64> =
            serde_json::from_str(&serde_json::to_string(&map).unwrap()).unwrap();
        assert_eq!(back["dedup.out/3"], 17);
    }

    #[test]
    fn malformed_keys_are_errors_not_defaults() {
        for bad in ["", "topic", "/3", "topic/x", "topic/"] {
            assert!(bad.parse::<TopicPartition>().is_err(), "{bad:?}");
        }
        let err = serde_json::from_str::<BTreeMap<TopicPartition, i64>>(r#"{"nope":1}"#);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("not a topic/partition"));
    }
}
