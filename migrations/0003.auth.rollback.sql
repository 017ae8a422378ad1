DROP TABLE login_throttle;
DROP TABLE access_tokens;
