//! Which appservices a room event interests, decided from their registrations' namespaces.
//!
//! An appservice is interested in an event when its sender is in the appservice's users
//! namespace (or is the appservice's own user), when the event is an `m.room.member` event whose
//! `state_key` is, or when the event's room is in its rooms namespace. Homeservers also match
//! room aliases and the room's joined members; those need room state this host does not keep,
//! so a homeserver that feeds the sidecar decides interest itself and this module serves the
//! demo and simple integrations.

use serde_json::Value;

use crate::registration::Registration;

/// The ids of the appservices interested in `event`, in registration order.
pub fn interested<'r>(
    event: &Value,
    registrations: &'r [Registration],
    server_name: &str,
) -> Vec<&'r str> {
    let text = |field: &str| event.get(field).and_then(Value::as_str);
    let sender = text("sender");
    let room_id = text("room_id");
    let member = (text("type") == Some("m.room.member"))
        .then(|| text("state_key"))
        .flatten();
    registrations
        .iter()
        .filter(|r| {
            let user =
                |id: Option<&str>| id.is_some_and(|id| r.is_interested_in_user(id, server_name));
            user(sender)
                || user(member)
                || room_id.is_some_and(|room| r.is_interested_in_room(room))
        })
        .map(|r| r.id.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::registration::parse;

    fn registration(id: &str, users: &str, rooms: &str) -> Registration {
        let text = format!(
            "id: {id}\nurl: null\nas_token: a-{id}\nhs_token: h-{id}\nsender_localpart: {id}bot\nnamespaces:\n  users: [{{regex: '{users}', exclusive: true}}]\n  rooms: [{{regex: '{rooms}', exclusive: false}}]\n"
        );
        parse(&text, Path::new("test.yaml")).unwrap()
    }

    /// Sender, member state_key and room id each make an appservice interested.
    #[test]
    fn interest_follows_sender_member_and_room() {
        let regs = [
            registration("tg", "@tg_.*:hs", "!bridged:hs"),
            registration("irc", "@irc_.*:hs", "!none:hs"),
        ];
        let event = |v: Value| interested(&v, &regs, "hs");
        let by_sender =
            serde_json::json!({"type": "m.room.message", "sender": "@tg_1:hs", "room_id": "!r:hs"});
        assert_eq!(event(by_sender), ["tg"]);
        let by_member = serde_json::json!({"type": "m.room.member", "state_key": "@irc_x:hs", "sender": "@alice:hs", "room_id": "!r:hs"});
        assert_eq!(event(by_member), ["irc"]);
        let by_room = serde_json::json!({"type": "m.room.message", "sender": "@alice:hs", "room_id": "!bridged:hs"});
        assert_eq!(event(by_room), ["tg"]);
        let own_user = serde_json::json!({"type": "m.room.message", "sender": "@ircbot:hs", "room_id": "!r:hs"});
        assert_eq!(event(own_user), ["irc"]);
        let nobody = serde_json::json!({"type": "m.room.message", "sender": "@alice:hs", "room_id": "!r:hs"});
        assert!(event(nobody).is_empty());
    }
}
