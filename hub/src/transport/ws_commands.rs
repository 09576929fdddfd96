//! A WebSocket's commands: `subscribe` (checked at once, started through the node's
//! channel-start routine in a future the body polls), `unsubscribe` and `refresh` (a new token
//! for the same `sub`). Reading frames and writing items is `ws`'s.

use super::ws::{
    reply_to, WsBody, REFRESHES_PER_SEC, REFRESH_BURST, RESUMES_PER_SEC, RESUME_BURST,
};
use crate::node::Want;
use crate::stream::{Item, Reply};
use crate::transport::ws_frames::{parse_frame, Command, Subscribe};
use std::sync::Arc;

impl WsBody {
    pub(super) fn on_text(&mut self, text: &str) {
        match parse_frame(text) {
            Ok(Command::Subscribe(sub)) => self.subscribe(sub),
            Ok(Command::Refresh(token)) => self.refresh(&token),
            Ok(Command::Unsubscribe(channel)) => {
                self.node().drop_channel(self.session(), &channel);
                self.reply(Reply::Unsubscribed(channel));
            }
            Err(e) => self.reply_error(400, &e.message, e.channel.as_deref()),
        }
    }

    /// Replaces the socket's token by one for the same `sub`: the new expiry applies, and the
    /// channels it no longer grants are unsubscribed, each with an error frame 403. A bad
    /// token, another `sub`, or a socket opened without a token is an error frame, and the old
    /// token stands.
    fn refresh(&mut self, token: &str) {
        if !self.refreshes.take() {
            return self.reply_error(
                429,
                &format!(
                    "too many refreshes on this socket: at most {REFRESH_BURST} at once, then one every {} s",
                    1.0 / REFRESHES_PER_SEC
                ),
                None,
            );
        }
        let Some(old) = self.claims.clone() else {
            return self.reply_error(
                403,
                "this socket was opened without a token: open a new one with the token",
                None,
            );
        };
        let claims = match self.node().auth.verify(token) {
            Ok(c) => c,
            Err(why) => {
                return self.reply_error(401, &format!("refresh refused: {why}"), None);
            }
        };
        if claims.sub != old.sub {
            return self.reply_error(
                403,
                "refresh refused: the new token is for another sub than the socket's",
                None,
            );
        }
        let exp = claims.exp;
        let claims = Arc::new(claims);
        self.session().set_expires_at(exp);
        self.node()
            .registry
            .set_token(self.session(), claims.token_id());
        self.claims = Some(claims.clone());
        self.reply(Reply::Refreshed(exp));
        for channel in self.session().channels() {
            if let Err(r) = self.node().auth.check(Some(&claims), channel.as_str()) {
                self.node().drop_channel(self.session(), &channel);
                self.reply_error(
                    403,
                    &format!("unsubscribed: {}", r.message),
                    Some(channel.as_str()),
                );
            }
        }
    }

    /// Checks a subscribe at once; what needs Redis (subscribing, reading history) is left
    /// to a future the body polls, and the client's next frames wait for it.
    fn subscribe(&mut self, sub: Subscribe) {
        let Subscribe {
            channel,
            since,
            rewind,
            presence,
        } = sub;
        let name = channel.as_str();
        if let Err(r) = self.node().auth.check(self.claims.as_deref(), name) {
            return self.reply_error(r.status(), &r.message, Some(name));
        }
        if presence && !self.node().config.namespaces.of(name).presence {
            return self.reply_error(
                403,
                "presence is off for this channel's namespace",
                Some(name),
            );
        }
        let session = self.session().clone();
        let max = self.node().config.max_channels_per_conn as usize;
        if session.channel_count() >= max {
            return self.reply_error(
                400,
                &format!("at most {max} channels per connection (HUB_MAX_CHANNELS_PER_CONN)"),
                Some(name),
            );
        }
        let history_len = self.node().config.history_len_of(name);
        if rewind > history_len {
            return self.reply_error(
                400,
                &format!("rewind must be from 0 to {history_len} (the channel's history length)"),
                Some(name),
            );
        }
        // `since` wins: a client that resumes wants what follows its position.
        let rewind = if since.is_some() { 0 } else { rewind };
        if (since.is_some() || rewind > 0) && !self.resumes.take() {
            return self.reply_error(
                429,
                &format!(
                    "too many subscribes with since or rewind on this socket: at most {RESUME_BURST} at once, then {RESUMES_PER_SEC} a second"
                ),
                Some(name),
            );
        }
        if !session.add_channel(channel.clone()) {
            // Already subscribed: say so again.
            return self.reply(Reply::Subscribed(channel));
        }
        if presence {
            session.want_presence(Some(channel.as_str()));
        }
        // An id that cannot be read is a reset, as on SSE.
        let want = match since.as_deref().map(str::parse) {
            None if rewind > 0 => Want::Rewind(rewind as usize),
            None => Want::Fresh,
            Some(Ok(p)) => Want::After(p),
            Some(Err(_)) => Want::Reset,
        };
        let node = self.node().clone();
        self.subscribing = Some(Box::pin(async move {
            let subscribed = Reply::Subscribed(channel.clone());
            let started = node
                .start_channels(&session, vec![(channel.clone(), want)], |_| {
                    vec![Item::Reply(Box::new(subscribed))]
                })
                .await;
            if let Err(r) = started {
                node.drop_channel(&session, &channel);
                reply_to(
                    &session,
                    &node,
                    Reply::Error {
                        code: r.status(),
                        message: r.message,
                        channel: Some(channel.as_str().to_owned()),
                    },
                );
            }
        }));
    }
}
